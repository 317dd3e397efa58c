#pragma once

// start_server: a server::Server made from cfg and started, for the frontend's integration
// tests; any failure ends the test case there with the server's own message.

#include <doctest/doctest.h>

#include <memory>
#include <utility>

#include "server/server.h"
#include "tlsreload/store.h"

namespace autotls::testing {

// start_server creates and starts a Server on cfg, with store (an empty one when null) and
// logger (none when null). REQUIREs that both succeed.
inline std::unique_ptr<server::Server> start_server(server::ServerConfig cfg,
                                                    std::shared_ptr<tlsreload::CertStore> store = nullptr,
                                                    Logger* logger = nullptr) {
  if (!store) store = std::make_shared<tlsreload::CertStore>();
  auto s = server::Server::create(std::move(cfg), std::move(store), nullptr, logger);
  REQUIRE_MESSAGE(s, s.error().message);
  REQUIRE((*s)->start());
  return std::move(*s);
}

}  // namespace autotls::testing
