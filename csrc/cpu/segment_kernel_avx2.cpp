// The AdamW element loop compiled for the AVX2 instruction set; setup.py gives
// this file its flags (-DCPU_CAPABILITY=AVX2 ...). See segment_kernel_impl.h.
#include "segment_kernel_impl.h"
