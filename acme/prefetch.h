#pragma once

// A transport that starts an ACME client's first two requests before the client exists, so
// that connecting to the CA (TCP and TLS handshakes, two round trips) overlaps with whatever
// the caller does meanwhile: reading storage, starting a challenge responder.

#include <memory>
#include <string>

#include "acme/transport.h"

namespace autotls::acme {

// make_prefetching_transport wraps inner and, on a background thread, at once sends GET
// directory_url and then, unless that reply already carries a Replay-Nonce, HEAD of the
// newNonce URL it names. The first request through the returned transport equal to one of
// those (same method and URL, no body) is answered with its reply, waiting for it while it is
// in flight, instead of being sent again; a failed prefetch is not kept (the request is then
// sent as usual). Every other request goes straight to inner, so one acme::Client built on
// the result (its create() fetches the directory, its first POST a nonce) sends nothing twice.
// Destroying the transport waits for the background thread (inner's timeouts bound it).
std::shared_ptr<HttpTransport> make_prefetching_transport(std::shared_ptr<HttpTransport> inner,
                                                          std::string directory_url);

}  // namespace autotls::acme
