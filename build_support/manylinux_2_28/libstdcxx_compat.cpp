// Compiled into the extension so that it needs nothing newer than GLIBCXX_3.4.24 (manylinux_2_28:
// GCC 8's libstdc++, RHEL 8). Since GCC 9, libstdc++ declares the default constructors of the string
// streams as instantiated in the library (symbol version GLIBCXX_3.4.26), so every
// `std::ostringstream s;` of the kernels' and torch's error messages imports them. Instantiating the
// two constructors here gives the extension its own (weak) definitions: the link then needs no
// GLIBCXX_3.4.26, and at load time the dynamic linker takes libstdc++'s when it has them, these when
// it does not (the same inline code of <sstream> either way).
#include <sstream>

template std::basic_stringstream<char>::basic_stringstream();
template std::basic_ostringstream<char>::basic_ostringstream();
