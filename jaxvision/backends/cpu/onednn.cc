// oneDNN convolutions and matrix multiplies as XLA FFI custom calls on CPU (built and loaded by
// jaxvision/native/__init__.py).
//
// XLA:CPU lowers a convolution to Eigen's spatial convolution, which on Intel Xeons with AVX-512
// runs ResNet's 3x3 layers at a third of oneDNN's speed (the library PyTorch uses): 16x56x56x64
// forward 24 ms against 9.8 ms, inside the same jitted program. Targets, with NHWC activations and
// HWIO kernels as Flax stores them, any stride, padding, dilation and group count, float32 or
// bfloat16:
//   jaxvision_conv_fwd          (x, w)  -> y
//   jaxvision_conv_bwd_data     (dy, w) -> dx
//   jaxvision_conv_bwd_weights  (x, dy) -> dw   (dw float32)
//   jaxvision_matmul            (a, b)  -> out  (2-D or batched 3-D, either operand transposed)
//   jaxvision_layer_norm_fwd    (x, scale, shift)          -> (y, mean, variance)   (float32, rows of x)
//   jaxvision_layer_norm_bwd    (x, dy, scale, mean, var)  -> (dx, dscale, dshift)
//   jaxvision_attention_fwd     (qkv)              -> (o, p)   (float32, qkv (b, n, 3, h, d), o (b, n, h, d))
//   jaxvision_attention_bwd     (qkv, p, do)       -> dqkv
//
// Threads: the work of a call is cut into one chunk per thread of XLA's intra-op pool (batch
// halves, or row blocks of a product), and each chunk runs oneDNN on one thread. Letting oneDNN
// spread a call over its own OpenMP team instead made the team and XLA's threads, which run
// other thunks at the same time, take turns on the same cores: ViT-S's GELU fusions ran 7x
// slower next to the products. A call whose batch does not divide falls back to the OpenMP team.
//
// Float32 products go to MKL's sgemm on Intel CPUs when the build links it (-DJAXVISION_MKL; the
// GEMM PyTorch runs): on the Intel VM it multiplies ViT's shapes at 320-340 GFLOP/s where oneDNN
// 3.2's reaches 240-300, most of all for a transposed operand; on an AMD EPYC it is oneDNN's that
// is faster, 218-225 against 190-198 GFLOP/s (docs/performance.md). JAXVISION_MKL=1 or 0 overrides
// the vendor. MKL runs sequentially, one chunk per thread like oneDNN.
//
// Primitives are created once per shape and thread count and kept (creation JIT-compiles a
// kernel); the kernel is reordered into the primitive's blocked layout on every call (it is
// small next to the maps). Scratch memory is a buffer per thread, kept: XLA may create a
// primitive on one of its threads and run it on another, and oneDNN's own scratchpad is sized
// per creating thread.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

extern "C" void omp_set_num_threads(int);
extern "C" int omp_get_num_procs(void);

#ifdef JAXVISION_MKL
// From mkl.h (LP64 interface, set below; CBLAS enums are ints), so the build needs only libmkl_rt.
extern "C" {
int MKL_Set_Interface_Layer(int);
int MKL_Set_Threading_Layer(int);
void MKL_Get_Version_String(char*, int);
void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
}
#endif

namespace ffi = xla::ffi;
using dnnl::memory;
using Dims = memory::dims;

namespace {

// Whether float32 products run on MKL: built with it, and JAXVISION_MKL=1, or unset on an Intel CPU.
bool UseMkl() {
#ifdef JAXVISION_MKL
  static const bool use = [] {
    const char* env = std::getenv("JAXVISION_MKL");
    __builtin_cpu_init();
    if (env == nullptr || *env == '\0' ? !__builtin_cpu_is("intel") : std::string(env) == "0") return false;
    MKL_Set_Interface_Layer(0);  // MKL_INTERFACE_LP64: 32-bit integers, as declared above
    MKL_Set_Threading_Layer(1);  // MKL_THREADING_SEQUENTIAL: the chunks are the threads
    return true;
  }();
  return use;
#else
  return false;
#endif
}

// What a cached plan is for (the first entry of its key).
enum Kind : int64_t { kForward, kBackwardData, kBackwardWeights, kMatmul, kLayerNorm, kSoftmax };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

dnnl::primitive_attr Attributes() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// This thread's scratch memory of at least `desc`'s size, kept for its next call.
memory Scratch(const memory::desc& desc) {
  thread_local std::vector<char> buffer;
  if (buffer.size() < desc.get_size()) buffer.resize(desc.get_size());
  return memory(desc, Engine(), buffer.data());
}

bool DataType(ffi::DataType t, memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32: *out = memory::data_type::f32; return true;
    case ffi::DataType::BF16: *out = memory::data_type::bf16; return true;
    default: return false;
  }
}

// fn(i) for i in [0, n): the caller runs chunks and so do up to n - 1 tasks on XLA's pool; each
// takes the next unclaimed chunk, so the caller never waits on a task that has not started (two
// calls on both pool threads cannot deadlock). Returns the first error message, or "".
template <typename F>
std::string ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
    std::string error;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      std::string error;
      try {
        omp_set_num_threads(1);  // this thread's OpenMP setting: oneDNN runs the chunk on it alone
        fn(i);
      } catch (const dnnl::error& e) {
        error = e.what();
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (!error.empty() && state->error.empty()) state->error = error;
      if (++state->done == n) state->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < n; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == n; });
  return state->error;
}

// How many chunks a call's `batch` is cut into, and oneDNN's threads per chunk.
struct Split {
  int64_t chunks, threads;
};

Split Plan(ffi::ThreadPool& pool, int64_t batch) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (batch >= threads && batch % threads == 0) return {threads, 1};
  return {1, std::max<int64_t>(threads, omp_get_num_procs())};
}

// One convolution's geometry: NHWC maps x (n, h, w, c) and y (n, oh, ow, o), HWIO kernel
// (kh, kw, c / groups, o), oneDNN's strides, dilations (minus one) and paddings.
struct Geometry {
  Dims x, w, y;
  Dims strides, dilates, pad_lo, pad_hi;
  int64_t groups, threads;
  memory::data_type act, wei;

  std::vector<int64_t> Key(Kind kind) const {
    std::vector<int64_t> key = {kind, groups, threads, static_cast<int64_t>(act), static_cast<int64_t>(wei)};
    for (const Dims* d : {&x, &w, &y, &strides, &dilates, &pad_lo, &pad_hi})
      key.insert(key.end(), d->begin(), d->end());
    return key;
  }
  memory::desc Map(const Dims& nhwc, memory::data_type t) const {
    return memory::desc({nhwc[0], nhwc[3], nhwc[1], nhwc[2]}, t, memory::format_tag::nhwc);
  }
  memory::desc Kernel(memory::data_type t, bool any) const {
    const int64_t kh = w[0], kw = w[1], i = w[2], o = w[3];
    if (groups == 1)
      return memory::desc({o, i, kh, kw}, t, any ? memory::format_tag::any : memory::format_tag::hwio);
    return memory::desc({groups, o / groups, i, kh, kw}, t, any ? memory::format_tag::any : memory::format_tag::hwigo);
  }
  dnnl::convolution_forward::primitive_desc Forward() const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Map(x, act),
        Kernel(act, true), Map(y, act), strides, dilates, pad_lo, pad_hi, Attributes());
  }
};

// A convolution primitive with the kernel's layouts around it: `user` is HWIO, `inner` the
// primitive's; `a` and `b` are its map operands, `out` its map result (none for weights).
struct ConvPlan {
  dnnl::primitive primitive;
  memory::desc a, b, out, user, inner, scratch;
  dnnl::reorder reorder;  // user -> inner (forward, backward data), inner -> user (weights)
  bool reordered = false;
};

ConvPlan MakeConvPlan(Kind kind, const Geometry& g) {
  ConvPlan p;
  if (kind == kForward) {
    auto pd = g.Forward();
    p.primitive = dnnl::convolution_forward(pd);
    p.a = pd.src_desc(), p.out = pd.dst_desc(), p.inner = pd.weights_desc(), p.scratch = pd.scratchpad_desc();
    p.user = g.Kernel(g.act, false);
  } else if (kind == kBackwardData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Map(g.x, g.act), g.Kernel(g.act, true), g.Map(g.y, g.act),
        g.strides, g.dilates, g.pad_lo, g.pad_hi, g.Forward(), Attributes());
    p.primitive = dnnl::convolution_backward_data(pd);
    p.a = pd.diff_dst_desc(), p.out = pd.diff_src_desc(), p.inner = pd.weights_desc(), p.scratch = pd.scratchpad_desc();
    p.user = g.Kernel(g.act, false);
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Map(g.x, g.act), g.Kernel(g.wei, true),
        g.Map(g.y, g.act), g.strides, g.dilates, g.pad_lo, g.pad_hi, g.Forward(), Attributes());
    p.primitive = dnnl::convolution_backward_weights(pd);
    p.a = pd.src_desc(), p.b = pd.diff_dst_desc(), p.inner = pd.diff_weights_desc(), p.scratch = pd.scratchpad_desc();
    p.user = g.Kernel(g.wei, false);
  }
  p.reordered = p.inner != p.user;
  if (p.reordered) {
    memory user(p.user, Engine(), DNNL_MEMORY_NONE), inner(p.inner, Engine(), DNNL_MEMORY_NONE);
    p.reorder = kind == kBackwardWeights ? dnnl::reorder(inner, user) : dnnl::reorder(user, inner);
  }
  return p;
}

// Plans are created under the caller's OpenMP thread count, which they are then run with.
template <typename P>
const P& Cached(const std::vector<int64_t>& key, int64_t threads, P (*make)(const void*), const void* arg) {
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, std::unique_ptr<P>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = plans[key];
  if (!slot) {
    omp_set_num_threads(static_cast<int>(threads));
    slot = std::make_unique<P>(make(arg));
  }
  return *slot;
}

const ConvPlan& CachedConv(Kind kind, const Geometry& g) {
  std::pair<Kind, const Geometry*> arg{kind, &g};
  return Cached<ConvPlan>(g.Key(kind), g.threads, [](const void* a) {
    auto* p = static_cast<const std::pair<Kind, const Geometry*>*>(a);
    return MakeConvPlan(p->first, *p->second);
  }, &arg);
}

Dims Vec(ffi::Span<const int64_t> s) { return Dims(s.begin(), s.end()); }

char* Offset(void* base, int64_t elements, memory::data_type t) {
  return static_cast<char*>(base) + elements * static_cast<int64_t>(memory::data_type_size(t));
}

ffi::Error RunConv(Kind kind, ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation, int64_t groups) {
  Geometry g;
  if (!DataType(a.element_type(), &g.act) || !DataType(out->element_type(), &g.wei))
    return ffi::Error::InvalidArgument("jaxvision oneDNN convolution: float32 or bfloat16 only");
  if (kind != kBackwardWeights) g.wei = g.act;
  if (kind == kBackwardWeights && g.wei != memory::data_type::f32)
    return ffi::Error::InvalidArgument("jaxvision oneDNN convolution: the kernel gradient is float32");
  if (kind == kForward) g.x = Vec(a.dimensions()), g.w = Vec(b.dimensions()), g.y = Vec(out->dimensions());
  if (kind == kBackwardData) g.y = Vec(a.dimensions()), g.w = Vec(b.dimensions()), g.x = Vec(out->dimensions());
  if (kind == kBackwardWeights) g.x = Vec(a.dimensions()), g.y = Vec(b.dimensions()), g.w = Vec(out->dimensions());
  g.groups = groups;
  g.strides = Vec(strides);
  g.pad_lo = {padding[0], padding[2]}, g.pad_hi = {padding[1], padding[3]};
  g.dilates = {dilation[0] - 1, dilation[1] - 1};
  const int64_t n = g.x[0];
  const Split split = Plan(pool, n);
  const int64_t per = n / split.chunks;
  const int64_t x_image = g.x[1] * g.x[2] * g.x[3], y_image = g.y[1] * g.y[2] * g.y[3];
  g.x[0] = g.y[0] = per, g.threads = split.threads;
  std::string error;
  try {
    const ConvPlan& p = CachedConv(kind, g);
    auto& e = Engine();
    if (kind == kBackwardWeights) {
      // Each chunk's partial kernel gradient in the primitive's layout, summed, then reordered.
      const size_t size = p.inner.get_size();
      std::vector<std::vector<char>> partial(split.chunks);
      error = ParallelFor(pool, split.chunks, [&](int64_t i) {
        omp_set_num_threads(static_cast<int>(split.threads));
        partial[i].resize(size);
        memory x_m(p.a, e, Offset(a.untyped_data(), i * per * x_image, g.act));
        memory dy_m(p.b, e, Offset(b.untyped_data(), i * per * y_image, g.act));
        memory dw(p.inner, e, partial[i].data());
        p.primitive.execute(Stream(), {{DNNL_ARG_SRC, x_m}, {DNNL_ARG_DIFF_DST, dy_m}, {DNNL_ARG_DIFF_WEIGHTS, dw},
                                       {DNNL_ARG_SCRATCHPAD, Scratch(p.scratch)}});
        Stream().wait();
      });
      if (error.empty() && split.chunks > 1) {  // partial[0] += the others, a slice per chunk
        const int64_t count = size / sizeof(float), slice = (count + split.chunks - 1) / split.chunks;
        error = ParallelFor(pool, split.chunks, [&](int64_t s) {
          float* sum = reinterpret_cast<float*>(partial[0].data());  // float32: Python asks for it
          for (int64_t i = 1; i < split.chunks; ++i) {
            const float* part = reinterpret_cast<const float*>(partial[i].data());
            for (int64_t j = s * slice; j < std::min(count, (s + 1) * slice); ++j) sum[j] += part[j];
          }
        });
      }
      memory inner(p.inner, e, partial[0].data()), user(p.user, e, out->untyped_data());
      if (p.reordered) {
        p.reorder.execute(Stream(), inner, user);
        Stream().wait();
      } else {
        std::memcpy(out->untyped_data(), partial[0].data(), p.user.get_size());
      }
    } else {
      memory user(p.user, e, b.untyped_data());
      memory kernel = p.reordered ? memory(p.inner, e) : user;
      if (p.reordered) {
        p.reorder.execute(Stream(), user, kernel);
        Stream().wait();
      }
      const int64_t in_image = kind == kForward ? x_image : y_image, out_image = kind == kForward ? y_image : x_image;
      error = ParallelFor(pool, split.chunks, [&](int64_t i) {
        omp_set_num_threads(static_cast<int>(split.threads));
        memory in(p.a, e, Offset(a.untyped_data(), i * per * in_image, g.act));
        memory result(p.out, e, Offset(out->untyped_data(), i * per * out_image, g.act));
        p.primitive.execute(Stream(), {{kind == kForward ? DNNL_ARG_SRC : DNNL_ARG_DIFF_DST, in},
                                       {DNNL_ARG_WEIGHTS, kernel},
                                       {kind == kForward ? DNNL_ARG_DST : DNNL_ARG_DIFF_SRC, result},
                                       {DNNL_ARG_SCRATCHPAD, Scratch(p.scratch)}});
        Stream().wait();
      });
    }
  } catch (const dnnl::error& err) {
    error = err.what();
  }
  if (!error.empty()) return ffi::Error::Internal("jaxvision oneDNN convolution: " + error);
  return ffi::Error::Success();
}

template <Kind kind>
ffi::Error ConvHandler(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                       ffi::Span<const int64_t> dilation, int64_t groups) {
  return RunConv(kind, pool, a, b, out, strides, padding, dilation, groups);
}

auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding")
      .Attr<ffi::Span<const int64_t>>("dilation")
      .Attr<int64_t>("groups");
}

// out (batch, m, n) = a (batch, m, k) b (batch, k, n), either operand stored transposed (a as
// (batch, k, m), b as (batch, n, k)), batch 1 for 2-D operands: a dense layer and both of its
// gradients without a transposed copy of any operand, and attention's batched products. A chunk
// is a run of batch entries, or for one matrix a block of the output's rows (`rows` of the
// `m_total` rows, read from a and written to out by strides).
struct MatmulGeometry {
  int64_t batch, rows, m_total, k, n, ta, tb, threads;
  memory::data_type in, result;
};

struct MatmulPlan {
  dnnl::matmul primitive;
  memory::desc a, b, out, scratch;
};

MatmulPlan MakeMatmulPlan(const MatmulGeometry& g) {
  const int64_t m = g.m_total, k = g.k, n = g.n;
  // A bfloat16 matrix: a row block's batch stride as if it were dense, since oneDNN's brgemm (AMX,
  // 1.5-2x its gemm:jit fallback) only recognises a plain layout by its strides. Float32 keeps the
  // fallback, measured faster than brgemm as row blocks (docs/performance.md).
  const bool dense = g.batch == 1 && g.in == memory::data_type::bf16;
  const int64_t a_batch = dense ? g.rows * k : m * k, out_batch = dense ? g.rows * n : m * n;
  memory::desc a({g.batch, g.rows, k}, g.in, g.ta ? Dims{a_batch, 1, m} : Dims{a_batch, k, 1});
  memory::desc b({g.batch, k, n}, g.in, g.tb ? Dims{k * n, 1, k} : Dims{k * n, n, 1});
  memory::desc out({g.batch, g.rows, n}, g.result, Dims{out_batch, n, 1});
  auto pd = dnnl::matmul::primitive_desc(Engine(), a, b, out, Attributes());
  return MatmulPlan{dnnl::matmul(pd), a, b, out, pd.scratchpad_desc()};
}

const MatmulPlan& CachedMatmul(const MatmulGeometry& g) {
  std::vector<int64_t> key = {kMatmul, g.batch, g.rows, g.m_total, g.k, g.n, g.ta, g.tb, g.threads,
                              static_cast<int64_t>(g.in), static_cast<int64_t>(g.result)};
  return Cached<MatmulPlan>(key, g.threads, [](const void* a) {
    return MakeMatmulPlan(*static_cast<const MatmulGeometry*>(a));
  }, &g);
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                  int64_t transpose_a, int64_t transpose_b) {
  MatmulGeometry g;
  if (!DataType(a.element_type(), &g.in) || a.element_type() != b.element_type() ||
      !DataType(out->element_type(), &g.result))
    return ffi::Error::InvalidArgument("jaxvision oneDNN matmul: float32 or bfloat16 operands of one dtype");
  auto ad = a.dimensions(), od = out->dimensions();
  const size_t rank = od.size();
  if ((rank != 2 && rank != 3) || ad.size() != rank || b.dimensions().size() != rank)
    return ffi::Error::InvalidArgument("jaxvision oneDNN matmul: 2-D or 3-D (batched) operands");
  const int64_t batch = rank == 3 ? od[0] : 1;
  g.m_total = od[rank - 2], g.n = od[rank - 1], g.k = transpose_a ? ad[rank - 2] : ad[rank - 1];
  g.ta = transpose_a, g.tb = transpose_b;
  // Chunks over the batch when it divides, else over blocks of rows.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool by_batch = batch >= threads && batch % threads == 0;
  const int64_t chunks = by_batch ? threads : std::min<int64_t>(threads, g.m_total);
  const int64_t block = (g.m_total + chunks - 1) / chunks;
  const bool mkl = UseMkl() && g.in == memory::data_type::f32 && g.result == memory::data_type::f32;
  std::string error = ParallelFor(pool, chunks, [&](int64_t i) {
    MatmulGeometry c = g;
    c.threads = 1;
    c.batch = by_batch ? batch / chunks : batch;
    const int64_t row0 = by_batch ? 0 : i * block, batch0 = by_batch ? i * c.batch : 0;
    c.rows = by_batch ? g.m_total : std::min(block, g.m_total - row0);
    if (c.rows <= 0) return;
    const int64_t a_off = batch0 * g.m_total * g.k + row0 * (g.ta ? 1 : g.k);
    const int64_t b_off = batch0 * g.k * g.n, out_off = batch0 * g.m_total * g.n + row0 * g.n;
    if (mkl) {
#ifdef JAXVISION_MKL
      const float* ap = static_cast<const float*>(a.untyped_data()) + a_off;
      const float* bp = static_cast<const float*>(b.untyped_data()) + b_off;
      float* op = static_cast<float*>(out->untyped_data()) + out_off;
      for (int64_t j = 0; j < c.batch; ++j)  // CblasRowMajor, CblasNoTrans or CblasTrans
        cblas_sgemm(101, g.ta ? 112 : 111, g.tb ? 112 : 111, c.rows, g.n, g.k, 1.f, ap + j * g.m_total * g.k,
                    g.ta ? g.m_total : g.k, bp + j * g.k * g.n, g.tb ? g.k : g.n, 0.f, op + j * g.m_total * g.n, g.n);
#endif
      return;
    }
    const MatmulPlan& p = CachedMatmul(c);
    auto& e = Engine();
    p.primitive.execute(Stream(), {{DNNL_ARG_SRC, memory(p.a, e, Offset(a.untyped_data(), a_off, g.in))},
                                   {DNNL_ARG_WEIGHTS, memory(p.b, e, Offset(b.untyped_data(), b_off, g.in))},
                                   {DNNL_ARG_DST, memory(p.out, e, Offset(out->untyped_data(), out_off, g.result))},
                                   {DNNL_ARG_SCRATCHPAD, Scratch(p.scratch)}});
    Stream().wait();
  });
  if (!error.empty()) return ffi::Error::Internal("jaxvision oneDNN matmul: " + error);
  return ffi::Error::Success();
}

// LayerNorm over the last axis of (rows, channels) float32 maps, with scale and shift: one pass
// each way where XLA makes several (mean, variance, normalise; and three reductions back). A
// chunk is a block of rows; the backward's scale and shift gradients are summed over chunks.
struct NormPlan {
  dnnl::layer_normalization_forward forward;
  dnnl::layer_normalization_backward backward;
  memory::desc map, stat, channel, forward_scratch, backward_scratch;
};

NormPlan MakeNormPlan(const std::vector<int64_t>& key) {
  const int64_t rows = key[1], channels = key[2];
  const float epsilon = static_cast<float>(key[3]) * 1e-12f;
  const auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  memory::desc map({rows, channels}, memory::data_type::f32, memory::format_tag::ab);
  memory::desc stat({rows}, memory::data_type::f32, memory::format_tag::a);
  auto fwd = dnnl::layer_normalization_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, map, map, stat, epsilon, flags, Attributes());
  auto bwd = dnnl::layer_normalization_backward::primitive_desc(
      Engine(), dnnl::prop_kind::backward, map, map, map, stat, epsilon, flags, fwd, Attributes());
  return NormPlan{dnnl::layer_normalization_forward(fwd), dnnl::layer_normalization_backward(bwd), map, stat,
                  memory::desc({channels}, memory::data_type::f32, memory::format_tag::a),
                  fwd.scratchpad_desc(), bwd.scratchpad_desc()};
}

const NormPlan& CachedNorm(int64_t rows, int64_t channels, float epsilon) {
  // epsilon in the key in units of 1e-12 (LayerNorm's are 1e-6 and 1e-5)
  std::vector<int64_t> key = {kLayerNorm, rows, channels, static_cast<int64_t>(epsilon * 1e12f + 0.5f)};
  return Cached<NormPlan>(key, 1, [](const void* a) {
    return MakeNormPlan(*static_cast<const std::vector<int64_t>*>(a));
  }, &key);
}

// Blocks of rows, one per pool thread: (chunks, rows per chunk).
std::pair<int64_t, int64_t> RowBlocks(ffi::ThreadPool& pool, int64_t rows) {
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), rows);
  return {chunks, (rows + chunks - 1) / chunks};
}

ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var, float epsilon) {
  const int64_t channels = x.dimensions().back(), rows = x.element_count() / channels;
  auto [chunks, block] = RowBlocks(pool, rows);
  std::string error = ParallelFor(pool, chunks, [&](int64_t i) {
    const int64_t row0 = i * block, n = std::min(block, rows - row0);
    if (n <= 0) return;
    const NormPlan& p = CachedNorm(n, channels, epsilon);
    auto& e = Engine();
    p.forward.execute(Stream(), {{DNNL_ARG_SRC, memory(p.map, e, const_cast<float*>(x.typed_data()) + row0 * channels)},
                                 {DNNL_ARG_DST, memory(p.map, e, y->typed_data() + row0 * channels)},
                                 {DNNL_ARG_MEAN, memory(p.stat, e, mean->typed_data() + row0)},
                                 {DNNL_ARG_VARIANCE, memory(p.stat, e, var->typed_data() + row0)},
                                 {DNNL_ARG_SCALE, memory(p.channel, e, const_cast<float*>(scale.typed_data()))},
                                 {DNNL_ARG_SHIFT, memory(p.channel, e, const_cast<float*>(shift.typed_data()))},
                                 {DNNL_ARG_SCRATCHPAD, Scratch(p.forward_scratch)}});
    Stream().wait();
  });
  if (!error.empty()) return ffi::Error::Internal("jaxvision oneDNN layer norm: " + error);
  return ffi::Error::Success();
}

ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dshift, float epsilon) {
  const int64_t channels = x.dimensions().back(), rows = x.element_count() / channels;
  auto [chunks, block] = RowBlocks(pool, rows);
  // Chunk 0 writes the scale and shift gradients in place, the others into `partial`.
  std::vector<std::vector<float>> partial(2 * chunks);
  std::string error = ParallelFor(pool, chunks, [&](int64_t i) {
    const int64_t row0 = i * block, n = std::min(block, rows - row0);
    float *ds = dscale->typed_data(), *dh = dshift->typed_data();
    if (i > 0) {
      partial[2 * i].assign(channels, 0.f), partial[2 * i + 1].assign(channels, 0.f);
      ds = partial[2 * i].data(), dh = partial[2 * i + 1].data();
    }
    if (n <= 0) return;
    const NormPlan& p = CachedNorm(n, channels, epsilon);
    auto& e = Engine();
    auto at = [&](const float* base, int64_t offset) { return const_cast<float*>(base) + offset; };
    p.backward.execute(Stream(), {{DNNL_ARG_SRC, memory(p.map, e, at(x.typed_data(), row0 * channels))},
                                  {DNNL_ARG_DIFF_DST, memory(p.map, e, at(dy.typed_data(), row0 * channels))},
                                  {DNNL_ARG_MEAN, memory(p.stat, e, at(mean.typed_data(), row0))},
                                  {DNNL_ARG_VARIANCE, memory(p.stat, e, at(var.typed_data(), row0))},
                                  {DNNL_ARG_SCALE, memory(p.channel, e, at(scale.typed_data(), 0))},
                                  // oneDNN 3.2 wants a shift argument here too; it reads none
                                  {DNNL_ARG_SHIFT, memory(p.channel, e, at(scale.typed_data(), 0))},
                                  {DNNL_ARG_DIFF_SRC, memory(p.map, e, dx->typed_data() + row0 * channels)},
                                  {DNNL_ARG_DIFF_SCALE, memory(p.channel, e, ds)},
                                  {DNNL_ARG_DIFF_SHIFT, memory(p.channel, e, dh)},
                                  {DNNL_ARG_SCRATCHPAD, Scratch(p.backward_scratch)}});
    Stream().wait();
  });
  if (!error.empty()) return ffi::Error::Internal("jaxvision oneDNN layer norm: " + error);
  for (int64_t i = 1; i < chunks; ++i) {
    if (partial[2 * i].empty()) continue;
    for (int64_t c = 0; c < channels; ++c) {
      dscale->typed_data()[c] += partial[2 * i][c];
      dshift->typed_data()[c] += partial[2 * i + 1][c];
    }
  }
  return ffi::Error::Success();
}

// Softmax attention one head at a time, every step a oneDNN primitive on one thread: the head's
// (n, n) scores stay in cache from the product that makes them through the softmax to the
// product that uses them, where XLA passes the whole batch's scores through memory between
// separate kernels. The heads are read from the fused projection's (b, n, 3, h, d) output and
// the output written as (b, n, h, d), each head copied through contiguous (n, d) buffers in cache
// (oneDNN's products read strided operands slower, and XLA's transposes cost more: docs/performance.md).
// q is scaled on the way in; p, the normalised probabilities, is kept for the backward:
// dv = p^T do, dp = do v^T, ds = p * (dp - rowsum(dp * p)) (oneDNN's softmax backward),
// dq = scale ds k, dk = ds^T (scale q).
struct SoftmaxPlan {
  dnnl::softmax_forward forward;
  dnnl::softmax_backward backward;
  memory::desc scores, forward_scratch, backward_scratch;
};

SoftmaxPlan MakeSoftmaxPlan(const int64_t* n) {
  memory::desc scores({*n, *n}, memory::data_type::f32, memory::format_tag::ab);
  auto fwd = dnnl::softmax_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_training,
                                                   dnnl::algorithm::softmax_accurate, scores, scores, 1, Attributes());
  auto bwd = dnnl::softmax_backward::primitive_desc(Engine(), dnnl::algorithm::softmax_accurate, scores, scores,
                                                    scores, 1, fwd, Attributes());
  return SoftmaxPlan{dnnl::softmax_forward(fwd), dnnl::softmax_backward(bwd), scores, fwd.scratchpad_desc(),
                     bwd.scratchpad_desc()};
}

const SoftmaxPlan& CachedSoftmax(int64_t n) {
  return Cached<SoftmaxPlan>({kSoftmax, n}, 1, [](const void* a) {
    return MakeSoftmaxPlan(static_cast<const int64_t*>(a));
  }, &n);
}

// out (m, n) = a b for one head's matrices, a (m, k) or stored (k, m), b (k, n) or stored (n, k).
void HeadMatmul(const float* a, const float* b, float* out, int64_t m, int64_t k, int64_t n, bool ta, bool tb) {
  MatmulGeometry g{1, m, m, k, n, ta, tb, 1, memory::data_type::f32, memory::data_type::f32};
  const MatmulPlan& p = CachedMatmul(g);
  auto& e = Engine();
  p.primitive.execute(Stream(), {{DNNL_ARG_SRC, memory(p.a, e, const_cast<float*>(a))},
                                 {DNNL_ARG_WEIGHTS, memory(p.b, e, const_cast<float*>(b))},
                                 {DNNL_ARG_DST, memory(p.out, e, out)},
                                 {DNNL_ARG_SCRATCHPAD, Scratch(p.scratch)}});
}

// Runs fn(head) for every head, heads in blocks over XLA's threads.
template <typename F>
std::string EachHead(ffi::ThreadPool& pool, int64_t heads, const F& fn) {
  auto [chunks, block] = RowBlocks(pool, heads);
  return ParallelFor(pool, chunks, [&](int64_t i) {
    for (int64_t h = i * block; h < std::min(heads, (i + 1) * block); ++h) fn(h);
    Stream().wait();
  });
}

// One head's (n, d) rows, `stride` floats apart in `from`, copied to `to` times `scale`, or back.
void Rows(const float* from, int64_t from_stride, float* to, int64_t to_stride, int64_t n, int64_t d, float scale) {
  for (int64_t t = 0; t < n; ++t) {
    const float* __restrict__ a = from + t * from_stride;
    float* __restrict__ b = to + t * to_stride;
    if (scale == 1.f) {
      std::memcpy(b, a, d * sizeof(float));
    } else {
      for (int64_t j = 0; j < d; ++j) b[j] = a[j] * scale;
    }
  }
}

void Gather(const float* from, int64_t stride, float* to, int64_t n, int64_t d, float scale) {
  Rows(from, stride, to, d, n, d, scale);
}

void Scatter(const float* from, float* to, int64_t stride, int64_t n, int64_t d, float scale) {
  Rows(from, d, to, stride, n, d, scale);
}

// Where head `i` of (b, n, 3, h, d) q, k, v (part 0, 1, 2) and of (b, n, h, d) o starts.
struct Heads {
  int64_t n, h, d;
  int64_t Qkv(int64_t i, int64_t part) const { return (i / h) * n * 3 * h * d + part * h * d + (i % h) * d; }
  int64_t Out(int64_t i) const { return (i / h) * n * h * d + (i % h) * d; }
};

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> o,
                            ffi::ResultBuffer<ffi::F32> p, float scale) {
  auto dims = qkv.dimensions();
  const Heads at{dims[1], dims[3], dims[4]};
  const int64_t n = at.n, d = at.d, row = 3 * at.h * d;
  const float* in = qkv.typed_data();
  std::string error = EachHead(pool, dims[0] * at.h, [&](int64_t i) {
    thread_local std::vector<float> buffer;  // q, k, v, o of this head
    buffer.resize(4 * n * d);
    float *q = buffer.data(), *k = q + n * d, *v = k + n * d, *out = v + n * d;
    Gather(in + at.Qkv(i, 0), row, q, n, d, scale);
    Gather(in + at.Qkv(i, 1), row, k, n, d, 1.f);
    Gather(in + at.Qkv(i, 2), row, v, n, d, 1.f);
    float* ph = p->typed_data() + i * n * n;
    HeadMatmul(q, k, ph, n, d, n, false, true);
    const SoftmaxPlan& s = CachedSoftmax(n);
    memory scores(s.scores, Engine(), ph);
    s.forward.execute(Stream(), {{DNNL_ARG_SRC, scores}, {DNNL_ARG_DST, scores},
                                 {DNNL_ARG_SCRATCHPAD, Scratch(s.forward_scratch)}});
    HeadMatmul(ph, v, out, n, n, d, false, false);
    Stream().wait();  // out is read next, by this thread
    Scatter(out, o->typed_data() + at.Out(i), at.h * d, n, d, 1.f);
  });
  if (!error.empty()) return ffi::Error::Internal("jaxvision oneDNN attention: " + error);
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> p,
                             ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dqkv, float scale) {
  auto dims = qkv.dimensions();
  const Heads at{dims[1], dims[3], dims[4]};
  const int64_t n = at.n, d = at.d, row = 3 * at.h * d;
  const float* in = qkv.typed_data();
  float* grad_in = dqkv->typed_data();
  std::string error = EachHead(pool, dims[0] * at.h, [&](int64_t i) {
    thread_local std::vector<float> buffer;  // q, k, v, do, dq, dk, dv of this head, then dp and ds
    buffer.resize(7 * n * d + n * n);
    float *q = buffer.data(), *k = q + n * d, *v = k + n * d, *dout_h = v + n * d;
    float *dq = dout_h + n * d, *dk = dq + n * d, *dv = dk + n * d, *grad = dv + n * d;
    Gather(in + at.Qkv(i, 0), row, q, n, d, scale);
    Gather(in + at.Qkv(i, 1), row, k, n, d, 1.f);
    Gather(in + at.Qkv(i, 2), row, v, n, d, 1.f);
    Gather(dout.typed_data() + at.Out(i), at.h * d, dout_h, n, d, 1.f);
    const float* ph = p.typed_data() + i * n * n;
    HeadMatmul(ph, dout_h, dv, n, n, d, true, false);
    HeadMatmul(dout_h, v, grad, n, d, n, false, true);
    const SoftmaxPlan& s = CachedSoftmax(n);
    memory probs(s.scores, Engine(), const_cast<float*>(ph)), ds(s.scores, Engine(), grad);
    s.backward.execute(Stream(), {{DNNL_ARG_DST, probs}, {DNNL_ARG_DIFF_DST, ds}, {DNNL_ARG_DIFF_SRC, ds},
                                  {DNNL_ARG_SCRATCHPAD, Scratch(s.backward_scratch)}});
    HeadMatmul(grad, k, dq, n, n, d, false, false);
    HeadMatmul(grad, q, dk, n, n, d, true, false);
    Stream().wait();
    Scatter(dq, grad_in + at.Qkv(i, 0), row, n, d, scale);
    Scatter(dk, grad_in + at.Qkv(i, 1), row, n, d, 1.f);
    Scatter(dv, grad_in + at.Qkv(i, 2), row, n, d, 1.f);
  });
  if (!error.empty()) return ffi::Error::Internal("jaxvision oneDNN attention: " + error);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvisionConvForward, ConvHandler<kForward>, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvisionConvBackwardData, ConvHandler<kBackwardData>, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvisionConvBackwardWeights, ConvHandler<kBackwardWeights>, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvisionMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("transpose_a")
                                  .Attr<int64_t>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvisionLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvisionLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvisionAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvisionAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

// The instruction set oneDNN dispatches to on this CPU and its version, and MKL's when float32
// products run on it, for logs.
extern "C" const char* JaxvisionOnednnInfo() {
  static std::string info = [] {
    const dnnl_version_t* v = dnnl_version();
    static const std::map<dnnl::cpu_isa, const char*> names = {
        {dnnl::cpu_isa::sse41, "sse41"}, {dnnl::cpu_isa::avx, "avx"}, {dnnl::cpu_isa::avx2, "avx2"},
        {dnnl::cpu_isa::avx2_vnni, "avx2_vnni"}, {dnnl::cpu_isa::avx512_core, "avx512_core"},
        {dnnl::cpu_isa::avx512_core_vnni, "avx512_core_vnni"}, {dnnl::cpu_isa::avx512_core_bf16, "avx512_core_bf16"},
        {dnnl::cpu_isa::avx512_core_amx, "avx512_core_amx"}};
    auto it = names.find(dnnl::get_effective_cpu_isa());
    std::string info = "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
                       std::to_string(v->patch) + " (" + (it == names.end() ? "other isa" : it->second) + ")";
#ifdef JAXVISION_MKL
    if (UseMkl()) {
      char text[256] = {};  // "Intel(R) oneAPI Math Kernel Library Version 2026.2.1-Product Build ..."
      MKL_Get_Version_String(text, sizeof(text) - 1);
      std::string version(text);
      const size_t at = version.find("Version ");
      version = at == std::string::npos ? "" : version.substr(at + 8, version.find_first_of("- ", at + 8) - at - 8);
      info += ", float32 products on MKL " + version;
    }
#endif
    return info;
  }();
  return info.c_str();
}
