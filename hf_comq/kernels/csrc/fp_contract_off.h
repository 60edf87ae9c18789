// Every product and sum rounded on its own, whatever the compiler's flags: the solver
// kernels' results do not depend on how the extension was built, and match the float32
// arithmetic of the torch code they stand in for.  Include it after the other headers:
// it applies to the functions defined below it (and GCC then does not inline functions
// defined above it, such as <algorithm>'s, into them).
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
