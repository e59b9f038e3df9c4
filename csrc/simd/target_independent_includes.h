// The C++ standard library headers of the SIMD kernel files, included BEFORE each
// file's `#pragma GCC target` so the library is compiled for the baseline like the
// rest of the build.  GCC 13 and 14.1 give the implicitly defined members of a class
// declared under the pragma the baseline target while its explicit always_inline
// members get the pragma's, then refuse to inline one into the other ("inlining
// failed in call to 'always_inline' ... target specific option mismatch": e.g.
// std::allocator's destructor in basic_string); a baseline callee is always
// inlinable into a caller compiled for more.  One cost: std::allocator, parsed here,
// gives an over-aligned type (a struct of AVX vectors) 16-byte aligned memory, so
// the kernels keep such types in an AlignedAllocator (csrc/cpu/bucket_loop.h).
// torch's headers follow the pragma (at::vec is compiled for its target there).
#pragma once

#include <algorithm>
#include <array>
#include <bitset>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
