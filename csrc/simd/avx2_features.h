// The feature macros of a file compiled for AVX2 + FMA + F16C (or more) by its own
// `#pragma GCC target`, which sets none of them: defined by hand so that at::vec
// and its SLEEF header select their AVX2 code.  Include right after the pragma,
// before anything else.
#pragma once

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
