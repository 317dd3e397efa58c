#include <iostream>

int main() {
  std::cout << "autotls " << AUTOTLS_VERSION << "\n";
  return 0;
}
