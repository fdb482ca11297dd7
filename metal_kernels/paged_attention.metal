// Paged-attention decode, pass 1: one query token per sequence over its paged KV context.
//
// This file is the *body* of an `mx.fast.metal_kernel`: MLX generates the signature from the
// input/output names (q, k_pool, v_pool, block_tables, context_lens, scale, blocks_per_part,
// window, softcap -> o_part, ml_part) and the template parameters T (dtype), D (head_dim), BS
// (block_size), GQ (query heads per threadgroup) and NSG (simdgroups per threadgroup). Batch,
// blocks, context lengths, scale, the partition size and the variants are run-time values: one
// compiled kernel serves every step and every layer.
//
// Variants (run time; 0 switches each off):
//   window   the query (the sequence's last token) sees only the last `window` tokens: blocks
//            before the window are never read, and partitions cover the window's blocks only
//   softcap  every score s becomes softcap * tanh(s / softcap) (Gemma 2)
// Attention sinks (gpt-oss) only change the softmax's denominator: pass 2 adds them.
//
// Memory layout (inputs are read through their strides, in elements, so MLX copies none: q is a
// slice of the step's rotated q|k rows, not row-contiguous)
//   q             [B, Hq, D]               Hq = Hkv * G (GQA: query heads h*G .. h*G+G-1 share KV head h)
//   k_pool/v_pool [Hkv, num_blocks, BS, D] token t of sequence b lives in block
//                                          block_tables[b, t / BS] at offset t % BS
//                                          (head-major: see metal_kernels/reference.py)
//   o_part        [B, Hq, P, D] float32    per-partition output, already divided by its own sum
//   ml_part       [B, Hq, P, 2] float32    per-partition (max score m, sum of exp l)
//
// Grid (MLX's grid counts threads): (P * NSG * 32, Hkv * G / GQ, B), threadgroups of NSG * 32.
// Threadgroup (p, y, b) takes partition p -- blocks [first + p * blocks_per_part, first + (p + 1) *
// blocks_per_part) of sequence b's table, `first` the window's first block (0 without a window)
// -- for KV head y / (G / GQ) and GQ of the query heads
// that share it, so each K/V element read from device memory serves GQ dot products. The launcher
// picks P at run time from batch x KV heads x table width, so that a launch has enough
// threadgroups to fill the GPU even at batch 1 (kernel.py: num_partitions). Each simdgroup takes
// a contiguous, block-aligned run of the partition's blocks: it reads a block-table entry once per
// block and walks that block's tokens from one base pointer. Each of its 32 lanes holds D/32
// consecutive elements of q, k, v and the output.
//
// Metal names are spelled out (metal::...) so the body does not rely on `using namespace metal`.
// ASCII only: MLX hands the source to Metal as an ASCII string.
//
// Per simdgroup, an online softmax over its tokens in fp32:
//   s = q.k * scale (a simd_sum over lanes);  m' = max(m, s);
//   l' = l * exp(m - m') + exp(s - m');       o' = o * exp(m - m') + exp(s - m') * v
// then, one query head at a time (threadgroup memory stays NSG * D floats whatever G is), the NSG
// simdgroups merge through threadgroup memory with the same rescaling and write one (o / l, m, l)
// per partition. A partition with no token (past the context, or a context-0 padding row) writes
// (0, -inf, 0). Pass 2 (paged_attention_merge.metal) merges the partitions exactly.

constexpr int EPT = (D + 31) / 32;        // head_dim elements per lane
constexpr bool FULL_LANES = D % 32 == 0;  // every lane holds EPT real elements: no guard at all

const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int part = threadgroup_position_in_grid.x;
const int b = threadgroup_position_in_grid.z;
const int num_parts = threadgroups_per_grid.x;
const int num_q_heads = q_shape[1];
const int num_kv_heads = k_pool_shape[0];
const int group = num_q_heads / num_kv_heads;
const int chunks = group / GQ;  // threadgroups per KV head
const int kv_head = threadgroup_position_in_grid.y / chunks;
const int q_head0 = kv_head * group + (threadgroup_position_in_grid.y % chunks) * GQ;
const int max_blocks = block_tables_shape[1];
// A context longer than its table (a caller's mistake) reads only the table's blocks.
const int context_len = metal::clamp(context_lens[b * context_lens_strides[0]], 0, max_blocks * BS);
const int used_blocks = (context_len + BS - 1) / BS;
const int first_token = window > 0 ? metal::max(0, context_len - window) : 0;  // the window's start
const int part_begin = metal::min(first_token / BS + part * blocks_per_part, used_blocks);
const int part_end = metal::min(part_begin + blocks_per_part, used_blocks);
const int per_sg = (part_end - part_begin + NSG - 1) / NSG;
const int my_begin = metal::min(part_begin + (int)sg * per_sg, part_end);
const int my_end = metal::min(my_begin + per_sg, part_end);
const int d0 = lane * EPT;                                    // this lane's first element
const int n_mine = FULL_LANES ? EPT : metal::clamp(D - d0, 0, EPT);  // its real elements

// Per-lane registers: this lane's slice of each query head, its running output, max and sum.
float q_reg[GQ][EPT];
float o_reg[GQ][EPT];
float m_reg[GQ];
float l_reg[GQ];
const int64_t q_d = q_strides[2];
for (int g = 0; g < GQ; g++) {
  const device T* q_row = q + b * q_strides[0] + (q_head0 + g) * q_strides[1] + d0 * q_d;
  for (int i = 0; i < EPT; i++) {
    q_reg[g][i] = (FULL_LANES || i < n_mine) ? float(q_row[i * q_d]) * scale : 0.0f;
    o_reg[g][i] = 0.0f;
  }
  m_reg[g] = -INFINITY;
  l_reg[g] = 0.0f;
}

// Per-head base pointers, computed once. Strides count elements: for the pool the engine
// allocates, a token is D apart and an element 1.
const device T* k_head = k_pool + kv_head * k_pool_strides[0] + d0 * k_pool_strides[3];
const device T* v_head = v_pool + kv_head * v_pool_strides[0] + d0 * v_pool_strides[3];
const int64_t k_t = k_pool_strides[2], k_d = k_pool_strides[3];
const int64_t v_t = v_pool_strides[2], v_d = v_pool_strides[3];
const device int* table = block_tables + b * block_tables_strides[0];
const int64_t table_step = block_tables_strides[1];
for (int blk = my_begin; blk < my_end; blk++) {
  const int64_t block = table[blk * table_step];  // one table read per block
  const device T* k_block = k_head + block * k_pool_strides[1];
  const device T* v_block = v_head + block * v_pool_strides[1];
  const int tokens = metal::min(BS, context_len - blk * BS);
  for (int j = metal::max(0, first_token - blk * BS); j < tokens; j++) {
    float k_reg[EPT];
    float v_reg[EPT];
    for (int i = 0; i < EPT; i++) {
      k_reg[i] = (FULL_LANES || i < n_mine) ? float(k_block[j * k_t + i * k_d]) : 0.0f;
      v_reg[i] = (FULL_LANES || i < n_mine) ? float(v_block[j * v_t + i * v_d]) : 0.0f;
    }
    for (int g = 0; g < GQ; g++) {
      float score = 0.0f;
      for (int i = 0; i < EPT; i++) {
        score += q_reg[g][i] * k_reg[i];
      }
      score = metal::simd_sum(score);
      if (softcap > 0.0f) {
        score = softcap * metal::precise::tanh(score / softcap);
      }
      const float m_new = metal::max(m_reg[g], score);
      const float rescale = metal::fast::exp(m_reg[g] - m_new);
      const float weight = metal::fast::exp(score - m_new);
      l_reg[g] = l_reg[g] * rescale + weight;
      for (int i = 0; i < EPT; i++) {
        o_reg[g][i] = o_reg[g][i] * rescale + weight * v_reg[i];
      }
      m_reg[g] = m_new;
    }
  }
}

// Merge the NSG simdgroups' partial softmaxes, one query head at a time.
threadgroup float tg_o[NSG * D];
threadgroup float tg_ml[NSG * 2];
for (int g = 0; g < GQ; g++) {
  for (int i = 0; i < n_mine; i++) {
    tg_o[sg * D + d0 + i] = o_reg[g][i];
  }
  if (lane == 0) {
    tg_ml[sg * 2] = m_reg[g];
    tg_ml[sg * 2 + 1] = l_reg[g];
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (sg == 0) {
    float m_all = -INFINITY;
    for (int s = 0; s < NSG; s++) {
      m_all = metal::max(m_all, tg_ml[s * 2]);
    }
    float l_all = 0.0f;
    float acc[EPT];
    for (int i = 0; i < EPT; i++) {
      acc[i] = 0.0f;
    }
    for (int s = 0; s < NSG; s++) {
      // A simdgroup that saw no token has l = 0 (and m = -inf): it must weigh nothing.
      const float w = tg_ml[s * 2 + 1] > 0.0f ? metal::fast::exp(tg_ml[s * 2] - m_all) : 0.0f;
      l_all += w * tg_ml[s * 2 + 1];
      for (int i = 0; i < n_mine; i++) {
        acc[i] += w * tg_o[s * D + d0 + i];
      }
    }
    const float inv_l = l_all > 0.0f ? 1.0f / l_all : 0.0f;
    const size_t row = ((size_t)b * num_q_heads + q_head0 + g) * num_parts + part;
    for (int i = 0; i < n_mine; i++) {
      o_part[row * D + d0 + i] = acc[i] * inv_l;
    }
    if (lane == 0) {
      ml_part[row * 2] = m_all;
      ml_part[row * 2 + 1] = l_all;
    }
  }
  // Simdgroup 0 must have read this head's slots before anyone writes the next head's.
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
}
