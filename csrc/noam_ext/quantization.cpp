// The host reference of quantization.h's maps and encoder, element by element: what the
// checkpoint conversions (python_quantization.h) use, and what the CPU loop's vector form
// (csrc/cpu/segment_kernel_impl.h) computes lane by lane. Out of line: one copy in the
// library, compiled with the baseline flags, of the functions that quantization_math.h
// defines once for the host and the CUDA kernels.
#include "quantization.h"

#include "quantization_math.h"

namespace noam_ext {

float decade_first_value(bool is_signed, int32_t d) { return quantization_math::decade_first_value(is_signed, d); }

BlockScale block_scale(float absmax) { return quantization_math::block_scale(absmax); }

float map_value(bool is_signed, int32_t code) { return quantization_math::map_value(is_signed, code); }

int32_t encode_moment(bool is_signed, float x, float r) {
  return quantization_math::encode_moment(is_signed, x, r);
}

}  // namespace noam_ext
