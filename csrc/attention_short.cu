// Short-segment attention forward on tensor cores (mma.sync m16n8k16, float32
// accumulation): the contract is in attention_short.h. Plain sm_80 instructions
// (cp.async, ldmatrix, mma.sync), so the same code runs on Ampere and Hopper.
//
// Work layout. A block takes `segments` consecutive segments for one query head
// (blockIdx.x: the group of segments, blockIdx.y: the query head). Each segment owns a
// slot of shared memory: its Q rows, then its K rows, then its V rows, every row DP
// elements (the head dim rounded up to a supported multiple of 16, see padded_head_dim)
// plus kPad elements of padding. Warp w of the block serves slot w / warps_per_segment
// and the 16 query rows (w % warps_per_segment) * 16 .. +15 of it: it computes the
// scores of those rows against every key of the segment at once (at most 128, so the
// softmax is exact in one pass, with no running max and no rescaling), then P V, and
// writes its rows of out and lse. Warps never need each other's results: the only
// block-wide barriers are the two that publish the loads.
//
// Loads: every thread of the block issues 16-byte cp.async copies global -> shared, Q
// and K first (commit group 0), then V (group 1), so V is still arriving while the
// scores are computed. Copies past a segment's last token or past the head dim are
// zero-filled (cp.async with src-size 0 reads nothing and writes 16 zero bytes): padded
// columns then add nothing to q.k, and padded V rows are 0 where p = 0 (uninitialised
// shared memory could hold NaN, and 0 * NaN = NaN).
//
// Shared rows are DP + kPad elements long: (DP + 8) * 2 bytes is an odd multiple of 16
// bytes for every DP that is a multiple of 16, so the eight 16-byte rows an ldmatrix
// phase reads fall into eight distinct groups of four banks (no bank conflicts).
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.f32, per warp:
// D[16 x 8] = A[16 x 16] B[16 x 8] + C. Lane l has g = l / 4 (0..7) and t = l % 4. A
// 32-bit register holds two 16-bit elements, the lower-indexed one in the low half.
//   A (4 regs):        a0 = A[g][2t, 2t+1]       a1 = A[g+8][2t, 2t+1]
//                      a2 = A[g][2t+8, 2t+9]     a3 = A[g+8][2t+8, 2t+9]
//   B (2 regs):        b0 = B[2t, 2t+1][g]       b1 = B[2t+8, 2t+9][g]
//   C, D (4 floats):   c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.x4 reads four 8 x 8 matrices of 16-bit elements from shared memory: lanes
// 8i .. 8i+7 give the addresses of the 8 rows (16 contiguous bytes each) of matrix i, and
// register i of lane l receives row g, columns 2t, 2t+1 of matrix i; with .trans it
// receives the transpose's, i.e. stored rows 2t, 2t+1 of stored column g.
//   S = Q K^T, k-step over d: A = Q[16 rows][16 d] is row major in shared memory; its
//     a0..a3 are the matrices (rows 0-7, d 0-7), (rows 8-15, d 0-7), (rows 0-7, d 8-15),
//     (rows 8-15, d 8-15). B[d][key] = K[key][d]: a stored K row is one key, so b0 for
//     keys n..n+7 is the matrix (keys n..n+7, d 0-7) read as stored, b1 the one at d 8-15.
//   O = P V, k-step over keys 16j..16j+15: A = P comes from the score accumulators with
//     no data movement: a0, a1 = score tile 2j's (c0, c1), (c2, c3) and a2, a3 = tile
//     2j+1's (the next 8 keys of the same rows), rounded to 16 bits. B[key][d] = V[key][d]
//     is stored row major but b0 needs two keys of one d column: ldmatrix.trans of the
//     matrix (keys 0-7, d n..n+7) gives it, and the one at keys 8-15 gives b1.
#include "attention_short.h"
#include "common.cuh"

namespace mmfast {
namespace {

constexpr int kMaxWarps = kAttnShortMaxSeqlen / 16;  // a 128-query segment: 16 rows per warp
constexpr int kMaxThreads = 32 * kMaxWarps;
constexpr int kTargetWarps = 4;                // short segments share a block up to this
constexpr int kPad = 8;                        // elements (16 bytes) after each shared row
constexpr size_t kSharedBudget = 96 * 1024;    // for a block of several segments
constexpr size_t kDefaultShared = 48 * 1024;   // more needs cudaFuncSetAttribute
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Window sides beyond this are unbounded for segments of at most 128 tokens: clamping
// them keeps the row bounds below in int range.
constexpr int kWindowClamp = 2 * kAttnShortMaxSeqlen;

struct Plan {
  int warps_per_segment;  // 16 query rows each
  int segments;           // segments per block
  int q_rows;             // query rows of a slot: 16 * warps_per_segment
  int k_rows;             // key rows (and value rows) of a slot: max_seqlen_k rounded up to 16
};

// ---- PTX wrappers ---------------------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously. With copy == false nothing is read and the
// 16 bytes are zero-filled (src must still be a valid address: callers pass the base).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool copy) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(copy ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most PENDING of this thread's commit groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}

// The 16-bit type's tensor-core instruction and its float -> packed-pair conversion.
template <typename T>
struct Tensor16;

template <>
struct Tensor16<__half> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // lo in the low half (the lower column index), both rounded to nearest even.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
  }
};

template <>
struct Tensor16<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
  }
};

// ---- the kernel ------------------------------------------------------------------------

struct Segment {
  int64_t q_start, k_start;  // first query token, first key token
  int len_q, len_k;          // 0 past the last segment, and for one too long for its slot
};

__device__ __forceinline__ Segment segment_at(const AttentionShortFwdArgs& a, int index) {
  Segment s{0, 0, 0, 0};
  if (index < a.batch) {
    // cu_seqlens clamped into [0, tokens] (a segment ending before its start is empty):
    // whatever the values, no row leaves the tensors.
    const int q0 = min(max(a.cu_seqlens_q[index], 0), a.tokens_q);
    const int k0 = min(max(a.cu_seqlens_k[index], 0), a.tokens_k);
    const int len_q = min(max(a.cu_seqlens_q[index + 1], q0), a.tokens_q) - q0;
    const int len_k = min(max(a.cu_seqlens_k[index + 1], k0), a.tokens_k) - k0;
    // A segment longer than max_seqlen (the caller's mistake: not checked without a sync)
    // does not fit its slot: it is left to the general kernel, which the launcher runs next.
    const bool fits = len_q <= a.max_seqlen_q && len_k <= a.max_seqlen_k;
    s.q_start = q0;
    s.k_start = k0;
    s.len_q = fits ? len_q : 0;
    s.len_k = fits ? len_k : 0;
  }
  return s;
}

__device__ __forceinline__ int round_up16(int n) { return (n + 15) & ~15; }

// Fills rows [0, round_up16(valid)) of a shared tile from global rows src, src + stride,
// ...: row r < valid, 16-byte chunk c < d_chunks is copied, the rest zero-filled.
// ``base`` is a readable address handed to the zero-filling copies (nothing is read).
template <typename T, int DP>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t stride, int valid, int d_chunks,
                                          const T* base) {
  constexpr int CHUNKS = DP / 8, LD = DP + kPad;
  const int count = round_up16(valid) * CHUNKS;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int row = i / CHUNKS, c = i % CHUNKS;
    const bool copy = row < valid && c < d_chunks;
    cp_async_16(tile + row * LD + c * 8, copy ? src + row * stride + c * 8 : base, copy);
  }
}

template <typename T, int DP, int KEY_TILES>
__global__ void __launch_bounds__(kMaxThreads) attention_short_fwd_kernel(const AttentionShortFwdArgs a,
                                                                          const Plan plan) {
  constexpr int LD = DP + kPad;     // shared row stride, elements
  constexpr int D_STEPS = DP / 16;  // k-steps of Q K^T; pairs of 8-wide output tiles of P V
  constexpr int CHUNKS = DP / 8;    // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* const shared = reinterpret_cast<T*>(shared_bytes);
  const int slot_elems = (plan.q_rows + 2 * plan.k_rows) * LD;
  const T* const q = static_cast<const T*>(a.q);
  const T* const k = static_cast<const T*>(a.k);
  const T* const v = static_cast<const T*>(a.v);

  const int head = blockIdx.y;
  const int kv_head = head / (a.heads / a.kv_heads);
  const int first_segment = blockIdx.x * plan.segments;
  const int d_chunks = a.head_dim / 8;

  // ---- 1. loads: Q and K of every slot (group 0), then V (group 1) ----
  for (int slot = 0; slot < plan.segments; ++slot) {
    const Segment s = segment_at(a, first_segment + slot);
    T* const q_tile = shared + slot * slot_elems;
    T* const k_tile = q_tile + plan.q_rows * LD;
    load_tile<T, DP>(q_tile, q + s.q_start * a.stride_qt + head * a.stride_qh, a.stride_qt, s.len_q, d_chunks, q);
    load_tile<T, DP>(k_tile, k + s.k_start * a.stride_kt + kv_head * a.stride_kh, a.stride_kt, s.len_k, d_chunks,
                     k);
  }
  cp_async_commit();
  for (int slot = 0; slot < plan.segments; ++slot) {
    const Segment s = segment_at(a, first_segment + slot);
    T* const v_tile = shared + slot * slot_elems + (plan.q_rows + plan.k_rows) * LD;
    load_tile<T, DP>(v_tile, v + s.k_start * a.stride_vt + kv_head * a.stride_vh, a.stride_vt, s.len_k, d_chunks,
                     v);
  }
  cp_async_commit();

  // ---- this warp's rows ----
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int slot = warp / plan.warps_per_segment;
  const int row0 = (warp % plan.warps_per_segment) * 16;  // first query row of the warp in its segment
  const Segment s = segment_at(a, first_segment + slot);
  const bool active = row0 < s.len_q;                     // uniform over the warp
  const int key_tiles = (s.len_k + 15) / 16;              // <= KEY_TILES: len_k <= max_seqlen_k
  T* const q_tile = shared + slot * slot_elems;
  const T* const k_tile = q_tile + plan.q_rows * LD;
  const T* const v_tile = k_tile + plan.k_rows * LD;

  // Per lane, index h = 0 for row row0 + g and h = 1 for row row0 + g + 8.
  float row_max[2], row_sum[2];  // in log2 units of the scaled scores
  uint32_t p[KEY_TILES][4];      // P as the A fragments of P V, one per 16 keys

  cp_async_wait<1>();  // this thread's Q and K copies have landed...
  __syncthreads();     // ...and every other thread's
  if (active) {
    // ---- 2. S = Q K^T: score tile n holds keys 8n .. 8n+7 ----
    float score[2 * KEY_TILES][4];
#pragma unroll
    for (int n = 0; n < 2 * KEY_TILES; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) score[n][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D_STEPS; ++kk) {
      uint32_t q_frag[4];
      // Lanes 0-15 address rows 0-15 at d 0-7, lanes 16-31 rows 0-15 at d 8-15.
      ldmatrix_x4(q_frag, q_tile + (row0 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int j = 0; j < KEY_TILES; ++j) {
        if (j < key_tiles) {
          uint32_t k_frag[4];
          // Lanes 0-7: keys 0-7 at d 0-7 (b0 of tile 2j), 8-15: keys 0-7 at d 8-15 (its b1),
          // 16-23: keys 8-15 at d 0-7 (b0 of tile 2j+1), 24-31: keys 8-15 at d 8-15 (its b1).
          ldmatrix_x4(k_frag, k_tile + (16 * j + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
          Tensor16<T>::mma(score[2 * j], q_frag, k_frag[0], k_frag[1]);
          Tensor16<T>::mma(score[2 * j + 1], q_frag, k_frag[2], k_frag[3]);
        }
      }
    }

    // ---- 3. mask and softmax, in registers ----
    // Row r sees keys [lo, hi): its window around the bottom-right aligned diagonal,
    // within the segment's keys. Tiles past key_tiles hold zeros and are masked here.
    const float scale_log2 = a.scale * kLog2e;
    int lo[2], hi[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int diag = row0 + g + 8 * h + s.len_k - s.len_q;
      lo[h] = a.window_left >= 0 ? max(diag - a.window_left, 0) : 0;
      hi[h] = a.window_right >= 0 ? min(diag + a.window_right + 1, s.len_k) : s.len_k;
      row_max[h] = -INFINITY;
      row_sum[h] = 0.f;
    }
#pragma unroll
    for (int n = 0; n < 2 * KEY_TILES; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = 8 * n + 2 * t + (e & 1), h = e >> 1;
        score[n][e] = key >= lo[h] && key < hi[h] ? score[n][e] * scale_log2 : -INFINITY;
        row_max[h] = fmaxf(row_max[h], score[n][e]);
      }
    }
    // The four lanes of a group (t = 0..3, lane bits 0 and 1) hold one row between them.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 1));
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 2));
      if (row_max[h] == -INFINITY) row_max[h] = 0.f;  // sees no key: every p is exp2(-inf) = 0
    }
#pragma unroll
    for (int n = 0; n < 2 * KEY_TILES; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        score[n][e] = exp2f(score[n][e] - row_max[e >> 1]);
        row_sum[e >> 1] += score[n][e];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    }
    // Unnormalised p, rounded to T for the tensor cores (1/row_sum is applied to O).
#pragma unroll
    for (int j = 0; j < KEY_TILES; ++j) {
      p[j][0] = Tensor16<T>::pack(score[2 * j][0], score[2 * j][1]);
      p[j][1] = Tensor16<T>::pack(score[2 * j][2], score[2 * j][3]);
      p[j][2] = Tensor16<T>::pack(score[2 * j + 1][0], score[2 * j + 1][1]);
      p[j][3] = Tensor16<T>::pack(score[2 * j + 1][2], score[2 * j + 1][3]);
    }
  }
  cp_async_wait<0>();  // V too
  __syncthreads();
  if (!active) return;  // no barrier follows

  // ---- 4. O = P V: output tile n holds d 8n .. 8n+7 ----
  float o[2 * D_STEPS][4];
#pragma unroll
  for (int n = 0; n < 2 * D_STEPS; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < KEY_TILES; ++j) {
    if (j < key_tiles) {
#pragma unroll
      for (int dd = 0; dd < D_STEPS; ++dd) {
        uint32_t v_frag[4];
        // Lanes 0-7: keys 0-7 at d 0-7 (b0 of tile 2dd), 8-15: keys 8-15 at d 0-7 (its b1),
        // 16-23: keys 0-7 at d 8-15 (b0 of tile 2dd+1), 24-31: keys 8-15 at d 8-15 (its b1).
        ldmatrix_x4_trans(v_frag, v_tile + (16 * j + (lane & 15)) * LD + dd * 16 + (lane >> 4) * 8);
        Tensor16<T>::mma(o[2 * dd], p[j], v_frag[0], v_frag[1]);
        Tensor16<T>::mma(o[2 * dd + 1], p[j], v_frag[2], v_frag[3]);
      }
    }
  }

  // ---- 5. normalise, stage in this warp's Q rows (done with), store 16 bytes a lane ----
  const float inv_sum[2] = {row_sum[0] > 0.f ? 1.f / row_sum[0] : 0.f, row_sum[1] > 0.f ? 1.f / row_sum[1] : 0.f};
  // The barrier above ordered every read of these Q rows (this warp's alone) before this.
  T* const staged = q_tile + row0 * LD;
#pragma unroll
  for (int n = 0; n < 2 * D_STEPS; ++n) {
    const int col = 8 * n + 2 * t;
    *reinterpret_cast<uint32_t*>(staged + g * LD + col) = Tensor16<T>::pack(o[n][0] * inv_sum[0], o[n][1] * inv_sum[0]);
    *reinterpret_cast<uint32_t*>(staged + (g + 8) * LD + col) =
        Tensor16<T>::pack(o[n][2] * inv_sum[1], o[n][3] * inv_sum[1]);
  }
  __syncwarp();  // lanes read back rows other lanes staged
  T* const out = static_cast<T*>(a.out) + (s.q_start + row0) * a.stride_ot + head * a.stride_oh;
  for (int i = lane; i < 16 * CHUNKS; i += 32) {
    const int r = i / CHUNKS, c = i % CHUNKS;
    if (row0 + r < s.len_q && c < d_chunks) {
      *reinterpret_cast<uint4*>(out + r * a.stride_ot + c * 8) = *reinterpret_cast<const uint4*>(staged + r * LD + c * 8);
    }
  }
  if (t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + g + 8 * h;
      if (r < s.len_q) {
        a.lse[head * a.stride_lh + s.q_start + r] =
            row_sum[h] > 0.f ? (row_max[h] + log2f(row_sum[h])) * kLn2 : -INFINITY;
      }
    }
  }
}

// ---- host side ------------------------------------------------------------------------------

const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int round_up16_host(int n) { return (n + 15) / 16 * 16; }

// The head dims the kernel is built for; others round up to the next (zero columns).
int padded_head_dim(int head_dim) {
  for (int dp : {32, 64, 80, 96, 128}) {
    if (head_dim <= dp) return dp;
  }
  return 0;
}

size_t slot_bytes(const Plan& plan, int dp, size_t element) {
  return static_cast<size_t>(plan.segments) * (plan.q_rows + 2 * plan.k_rows) * (dp + kPad) * element;
}

// Warps per segment from the longest query segment; segments share a block up to
// kTargetWarps warps, as long as their slots fit the shared-memory budget.
Plan make_plan(const AttentionShortFwdArgs& a, int dp, size_t element) {
  Plan plan;
  plan.warps_per_segment = a.max_seqlen_q > 0 ? (a.max_seqlen_q + 15) / 16 : 1;
  plan.q_rows = 16 * plan.warps_per_segment;
  plan.k_rows = round_up16_host(a.max_seqlen_k);
  plan.segments = plan.warps_per_segment < kTargetWarps ? kTargetWarps / plan.warps_per_segment : 1;
  while (plan.segments > 1 && slot_bytes(plan, dp, element) > kSharedBudget) --plan.segments;
  return plan;
}

template <typename T, int DP, int KEY_TILES>
const char* launch(const AttentionShortFwdArgs& a, const Plan& plan, cudaStream_t stream) {
  const size_t shared = slot_bytes(plan, DP, sizeof(T));
  const auto kernel = attention_short_fwd_kernel<T, DP, KEY_TILES>;
  if (shared > kDefaultShared &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)) !=
          cudaSuccess) {
    return launch_error();
  }
  const dim3 grid(static_cast<unsigned>((a.batch + plan.segments - 1) / plan.segments), static_cast<unsigned>(a.heads));
  const dim3 block(static_cast<unsigned>(32 * plan.warps_per_segment * plan.segments));
  kernel<<<grid, block, shared, stream>>>(a, plan);
  return launch_error();
}

template <typename T, int DP>
const char* launch_keys(const AttentionShortFwdArgs& a, const Plan& plan, cudaStream_t stream) {
  // Score registers for 64 keys, or for 128: short windows keep the smaller footprint.
  return plan.k_rows <= 64 ? launch<T, DP, 4>(a, plan, stream) : launch<T, DP, 8>(a, plan, stream);
}

template <typename T>
const char* launch_typed(const AttentionShortFwdArgs& a, cudaStream_t stream) {
  const int dp = padded_head_dim(a.head_dim);
  const Plan plan = make_plan(a, dp, sizeof(T));
  switch (dp) {
    case 32: return launch_keys<T, 32>(a, plan, stream);
    case 64: return launch_keys<T, 64>(a, plan, stream);
    case 80: return launch_keys<T, 80>(a, plan, stream);
    case 96: return launch_keys<T, 96>(a, plan, stream);
    case 128: return launch_keys<T, 128>(a, plan, stream);
  }
  return "attention_short_fwd: unsupported head dim";
}

const char* bad_args(const AttentionShortFwdArgs& a) {
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) return "attention_short_fwd: float16 or bfloat16 only";
  if (a.head_dim < 8 || a.head_dim > kAttnShortMaxHeadDim || a.head_dim % 8 != 0) {
    return "attention_short_fwd: head dim must be a multiple of 8 in 8..128";
  }
  if (a.max_seqlen_q < 0 || a.max_seqlen_q > kAttnShortMaxSeqlen || a.max_seqlen_k < 0 ||
      a.max_seqlen_k > kAttnShortMaxSeqlen) {
    return "attention_short_fwd: max_seqlen_q and max_seqlen_k must be in 0..128";
  }
  if (a.batch < 0 || a.heads <= 0 || a.heads > 65535 || a.kv_heads <= 0 || a.heads % a.kv_heads != 0) {
    return "attention_short_fwd: heads must be a positive multiple of kv_heads, at most 65535";
  }
  const int64_t strides[] = {a.stride_qt, a.stride_qh, a.stride_kt, a.stride_kh,
                             a.stride_vt, a.stride_vh, a.stride_ot, a.stride_oh};
  for (int64_t stride : strides) {
    if (stride % 8 != 0) return "attention_short_fwd: token and head strides must be multiples of 8 elements";
  }
  if (!aligned16(a.q) || !aligned16(a.k) || !aligned16(a.v) || !aligned16(a.out)) {
    return "attention_short_fwd: q, k, v and out must be 16-byte aligned";
  }
  return nullptr;
}

}  // namespace

const char* attention_short_fwd(const AttentionShortFwdArgs& args, void* stream) {
  if (const char* err = bad_args(args)) return err;
  if (args.batch == 0 || args.max_seqlen_q == 0) return nullptr;  // no query token
  AttentionShortFwdArgs a = args;
  const auto clamp = [](int side) { return side < 0 ? -1 : (side < kWindowClamp ? side : kWindowClamp); };
  a.window_left = clamp(a.window_left);
  a.window_right = clamp(a.window_right);
  auto s = static_cast<cudaStream_t>(stream);
  return a.dtype == DType::kFloat16 ? launch_typed<__half>(a, s) : launch_typed<__nv_bfloat16>(a, s);
}

}  // namespace mmfast
