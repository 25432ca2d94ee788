// The AdamW element loop compiled for the DEFAULT instruction set; setup.py gives
// this file its flags (-DCPU_CAPABILITY=DEFAULT ...). See segment_kernel_impl.h.
#include "segment_kernel_impl.h"
