#pragma once

#include <string>
#include <vector>

#include "acme/key.h"
#include "acme/types.h"
#include "acme/util/error.h"

namespace autotls::acme {

// make_csr returns a DER PKCS#10 request signed by key, with every identifier in a
// subjectAltName (dNSName or iPAddress) and the first DNS name as the subject CN when it fits
// in 64 octets. Fails with Errc::invalid_input on an empty list or an unparsable IP.
Result<std::string> make_csr(const PrivateKey& key, const std::vector<Identifier>& identifiers);

}  // namespace autotls::acme
