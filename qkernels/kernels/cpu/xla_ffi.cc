// XLA FFI handlers (jax.ffi, platform "cpu") over the qk_cpu kernels: jax_bindings/native.py registers and
// calls them.
//
// Every operand has a core shape (x (M, K), w (N, KS), scales (N,) or (N, G), bias (N,), out (M, N)) and
// optional leading axes: a batched problem's B, or those `jax.vmap` adds (vmap_method="expand_dims": size 1
// on the operands not mapped). Leading axes broadcast like NumPy's; the kernel runs once per index of
// their broadcast shape, on each operand's slice of it.
//
// Attributes (all int64): w_kind (QK_INT8 / QK_INT4 / QK_UINT4 / QK_FP8_E4M3), group_size (0: per row),
// kp (the padded K), threads, has_bias (a bias buffer of shape (0,) is passed otherwise), and for the float
// handler has_zero (uint4 zero points; a (0,) buffer otherwise).
//
// Threads: the kernels' helper threads run on XLA:CPU's intra-op pool (`OnPool`, qk_set_thread_scheduler), so a
// parallel call shares XLA's workers instead of adding threads that compete with them for the same cores.
//
// Non-finite activations: rows holding NaN/Inf come out NaN, as XLA's own ops give them under jit (the row's
// scale is NaN); no error is raised (the host cannot look at the values without a sync).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "qk_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

int32_t FloatCode(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return QK_F32;
    case ffi::DataType::BF16: return QK_BF16;
    case ffi::DataType::F16: return QK_F16;
    default: return -1;
  }
}

size_t FloatBytes(int32_t code) { return code == QK_F32 ? 4 : 2; }

// One operand: its data, element size, dimensions and how many trailing axes are its core.
struct Operand {
  char* data;
  size_t elem;
  ffi::AnyBuffer::Dimensions dims;
  int core;

  int64_t lead_rank() const { return static_cast<int64_t>(dims.size()) - core; }
  int64_t core_elems() const {
    int64_t n = 1;
    for (size_t i = dims.size() - core; i < dims.size(); i++) n *= dims[i];
    return n;
  }
};

// The broadcast leading shape of `ops`, and per operand the element offset of each flat batch index.
class Batches {
 public:
  static ffi::Error Make(const std::vector<Operand>& ops, Batches* out) {
    int64_t rank = 0;
    for (const Operand& o : ops) {
      if (o.lead_rank() < 0) return ffi::Error::InvalidArgument("an operand has fewer axes than its core shape");
      rank = o.lead_rank() > rank ? o.lead_rank() : rank;
    }
    out->shape_.assign(rank, 1);
    for (const Operand& o : ops)
      for (int64_t d = 0; d < o.lead_rank(); d++) {
        int64_t size = o.dims[d], axis = rank - o.lead_rank() + d;
        if (size != 1 && out->shape_[axis] != 1 && out->shape_[axis] != size)
          return ffi::Error::InvalidArgument("leading (batch) axes of the operands do not broadcast: " +
                                             std::to_string(size) + " against " + std::to_string(out->shape_[axis]));
        if (size != 1) out->shape_[axis] = size;
      }
    out->count_ = 1;
    for (int64_t s : out->shape_) out->count_ *= s;
    out->offsets_.assign(ops.size() * out->count_, 0);
    for (size_t i = 0; i < ops.size(); i++) {
      const Operand& o = ops[i];
      for (int64_t b = 0; b < out->count_; b++) {
        int64_t rest = b, offset = 0, stride = o.core_elems();
        for (int64_t axis = rank - 1; axis >= 0; axis--) {
          int64_t idx = rest % out->shape_[axis];
          rest /= out->shape_[axis];
          int64_t d = axis - (rank - o.lead_rank());
          if (d >= 0) {
            if (o.dims[d] != 1) offset += idx * stride;
            stride *= o.dims[d];
          }
        }
        out->offsets_[i * out->count_ + b] = offset;
      }
    }
    return ffi::Error::Success();
  }

  int64_t count() const { return count_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  // the pointer to operand i's slice for batch b
  void* at(const std::vector<Operand>& ops, size_t i, int64_t b) const {
    return ops[i].data + static_cast<size_t>(offsets_[i * count_ + b]) * ops[i].elem;
  }

 private:
  std::vector<int64_t> shape_;
  std::vector<int64_t> offsets_;
  int64_t count_ = 0;
};

Operand Of(const ffi::AnyBuffer& b, size_t elem, int core) {
  return Operand{static_cast<char*>(b.untyped_data()), elem, b.dimensions(), core};
}

Operand Of(ffi::Result<ffi::AnyBuffer>& b, size_t elem, int core) {
  return Operand{static_cast<char*>(b->untyped_data()), elem, b->dimensions(), core};
}

int64_t Dim(const Operand& o, int from_end) { return o.dims[o.dims.size() - from_end]; }

ffi::Error Status(int64_t rc, const char* entry) {
  if (rc >= 0) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(entry) + " refused its arguments (" +
                                     (rc == QK_ENOMEM ? "out of memory" : "a kind, dtype or size it does not take") +
                                     "); qkernels' supports() should have refused this problem");
}

ffi::Error CheckOut(const Operand& out, const Batches& batches, int64_t m, int64_t n) {
  if (out.lead_rank() != static_cast<int64_t>(batches.shape().size()) || Dim(out, 2) != m || Dim(out, 1) != n)
    return ffi::Error::InvalidArgument("the output's shape is not the operands' broadcast (..., M, N)");
  for (size_t d = 0; d < batches.shape().size(); d++)
    if (out.dims[d] != batches.shape()[d])
      return ffi::Error::InvalidArgument("the output's leading axes are not the operands' broadcast");
  return ffi::Error::Success();
}

// For its lifetime, the calling thread's kernel calls schedule their helpers on `pool`; a helper that starts
// after the call returned finds no work left (qk_cpu.c's parallel_n), so it never outlives what it reads.
class OnPool {
 public:
  explicit OnPool(ffi::ThreadPool& pool) { qk_set_thread_scheduler(&OnPool::Schedule, &pool); }
  ~OnPool() { qk_set_thread_scheduler(nullptr, nullptr); }
  OnPool(const OnPool&) = delete;
  OnPool& operator=(const OnPool&) = delete;

 private:
  static void Schedule(void* ctx, qk_work_fn work, void* arg) {
    static_cast<ffi::ThreadPool*>(ctx)->Schedule([work, arg] { work(arg); });
  }
};

// --- activations quantized here (W8A8, W4A8, FP8 dynamic) ------------------------------------------------

ffi::Error LinearQuantized(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer ws, ffi::AnyBuffer bias,
                           ffi::Result<ffi::AnyBuffer> out, int64_t w_kind, int64_t group_size, int64_t kp,
                           int64_t threads, int64_t has_bias, ffi::ThreadPool pool) {
  OnPool on_pool(pool);
  const int32_t xdt = FloatCode(x.element_type()), odt = FloatCode(out->element_type());
  if (xdt < 0 || odt < 0) return ffi::Error::InvalidArgument("activations and output must be f32, bf16 or f16");
  std::vector<Operand> ops = {Of(x, FloatBytes(xdt), 2), Of(w, 1, 2), Of(ws, 4, group_size ? 2 : 1),
                              Of(bias, 4, 1), Of(out, FloatBytes(odt), 2)};
  Batches batches;
  if (ffi::Error e = Batches::Make(ops, &batches); e.failure()) return e;
  const int64_t m = Dim(ops[0], 2), k = Dim(ops[0], 1), n = Dim(ops[1], 2);
  if (ffi::Error e = CheckOut(ops[4], batches, m, n); e.failure()) return e;
  for (int64_t b = 0; b < batches.count(); b++) {
    int64_t rc = qk_linear_quantized(batches.at(ops, 0, b), xdt, m, k, kp, nullptr, batches.at(ops, 1, b),
                                     static_cast<int32_t>(w_kind), n, static_cast<const float*>(batches.at(ops, 2, b)),
                                     group_size, has_bias ? static_cast<const float*>(batches.at(ops, 3, b)) : nullptr,
                                     batches.at(ops, 4, b), odt, static_cast<int32_t>(threads));
    if (ffi::Error e = Status(rc, "qk_linear_quantized"); e.failure()) return e;
  }
  return ffi::Error::Success();
}

// --- activations the caller quantized (static recipes): int8 or e4m3 codes (M, KP), scales (M,) ------------

ffi::Error MatmulCodes(ffi::AnyBuffer xq, ffi::AnyBuffer xs, ffi::AnyBuffer w, ffi::AnyBuffer ws,
                       ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out, int64_t w_kind, int64_t group_size,
                       int64_t kp, int64_t threads, int64_t has_bias, ffi::ThreadPool pool) {
  OnPool on_pool(pool);
  const int32_t odt = FloatCode(out->element_type());
  if (odt < 0) return ffi::Error::InvalidArgument("the output must be f32, bf16 or f16");
  std::vector<Operand> ops = {Of(xq, 1, 2), Of(xs, 4, 1), Of(w, 1, 2), Of(ws, 4, group_size ? 2 : 1),
                              Of(bias, 4, 1), Of(out, FloatBytes(odt), 2)};
  Batches batches;
  if (ffi::Error e = Batches::Make(ops, &batches); e.failure()) return e;
  const int64_t m = Dim(ops[0], 2), n = Dim(ops[2], 2);
  if (Dim(ops[0], 1) != kp) return ffi::Error::InvalidArgument("activation codes must be padded to kp columns");
  if (ffi::Error e = CheckOut(ops[5], batches, m, n); e.failure()) return e;
  for (int64_t b = 0; b < batches.count(); b++) {
    const float* bp = has_bias ? static_cast<const float*>(batches.at(ops, 4, b)) : nullptr;
    const float* xsp = static_cast<const float*>(batches.at(ops, 1, b));
    const float* wsp = static_cast<const float*>(batches.at(ops, 3, b));
    int64_t rc = w_kind == QK_FP8_E4M3
        ? qk_matmul_fp8(static_cast<const uint8_t*>(batches.at(ops, 0, b)), xsp, m, kp,
                        static_cast<const uint8_t*>(batches.at(ops, 2, b)), n, wsp, bp, batches.at(ops, 5, b), odt,
                        static_cast<int32_t>(threads))
        : qk_matmul_int(static_cast<const int8_t*>(batches.at(ops, 0, b)), xsp, m, kp, batches.at(ops, 2, b),
                        static_cast<int32_t>(w_kind), n, wsp, group_size, bp, batches.at(ops, 5, b), odt,
                        static_cast<int32_t>(threads));
    if (ffi::Error e = Status(rc, "qk_matmul_codes"); e.failure()) return e;
  }
  return ffi::Error::Success();
}

// --- weight-only (W8A16, W4A16, FP8A16) -------------------------------------------------------------------

ffi::Error LinearFloat(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer ws, ffi::AnyBuffer wz, ffi::AnyBuffer bias,
                       ffi::Result<ffi::AnyBuffer> out, int64_t w_kind, int64_t group_size, int64_t kp,
                       int64_t threads, int64_t has_bias, int64_t has_zero, ffi::ThreadPool pool) {
  OnPool on_pool(pool);
  const int32_t xdt = FloatCode(x.element_type()), odt = FloatCode(out->element_type());
  if (xdt < 0 || odt < 0) return ffi::Error::InvalidArgument("activations and output must be f32, bf16 or f16");
  const int g = group_size ? 2 : 1;
  std::vector<Operand> ops = {Of(x, FloatBytes(xdt), 2), Of(w, 1, 2), Of(ws, 4, g), Of(wz, 1, has_zero ? g : 1),
                              Of(bias, 4, 1), Of(out, FloatBytes(odt), 2)};
  Batches batches;
  if (ffi::Error e = Batches::Make(ops, &batches); e.failure()) return e;
  const int64_t m = Dim(ops[0], 2), k = Dim(ops[0], 1), n = Dim(ops[1], 2);
  if (ffi::Error e = CheckOut(ops[5], batches, m, n); e.failure()) return e;
  for (int64_t b = 0; b < batches.count(); b++) {
    int64_t rc = qk_linear_float(batches.at(ops, 0, b), xdt, m, k, kp, batches.at(ops, 1, b),
                                 static_cast<int32_t>(w_kind), n, static_cast<const float*>(batches.at(ops, 2, b)),
                                 has_zero ? static_cast<const int8_t*>(batches.at(ops, 3, b)) : nullptr, group_size,
                                 has_bias ? static_cast<const float*>(batches.at(ops, 4, b)) : nullptr,
                                 batches.at(ops, 5, b), odt, static_cast<int32_t>(threads));
    if (ffi::Error e = Status(rc, "qk_linear_float"); e.failure()) return e;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkLinearQuantized, LinearQuantized,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x (..., M, K) float
                                  .Arg<ffi::AnyBuffer>()  // w (..., N, KS) codes
                                  .Arg<ffi::AnyBuffer>()  // w_scale f32 (..., N) or (..., N, G)
                                  .Arg<ffi::AnyBuffer>()  // bias f32 (..., N), or (0,)
                                  .Ret<ffi::AnyBuffer>()  // out (..., M, N)
                                  .Attr<int64_t>("w_kind")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("kp")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("has_bias")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkMatmulCodes, MatmulCodes,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // xq (..., M, KP) int8 / e4m3 codes
                                  .Arg<ffi::AnyBuffer>()  // x_scale f32 (..., M)
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // w_scale
                                  .Arg<ffi::AnyBuffer>()  // bias or (0,)
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int64_t>("w_kind")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("kp")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("has_bias")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QkLinearFloat, LinearFloat,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x (..., M, K) float
                                  .Arg<ffi::AnyBuffer>()  // w codes
                                  .Arg<ffi::AnyBuffer>()  // w_scale
                                  .Arg<ffi::AnyBuffer>()  // w_zero int8 (..., N, G), or (0,)
                                  .Arg<ffi::AnyBuffer>()  // bias or (0,)
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int64_t>("w_kind")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("kp")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("has_zero")
                                  .Ctx<ffi::ThreadPool>());
