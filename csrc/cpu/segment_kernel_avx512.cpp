// The AdamW element loop compiled for the AVX512 instruction set; setup.py gives
// this file its flags (-DCPU_CAPABILITY=AVX512 ...). See segment_kernel_impl.h.
#include "segment_kernel_impl.h"
