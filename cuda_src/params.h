// The one parameter block every cuflash kernel takes, by value.
//
// Filled on the host by cuflash/_params.py, which builds its NumPy record type by reading
// this file: keep exactly one field per line, written `TYPE NAME;`, with the 8-byte
// fields first and the 4-byte fields after them, so that C and NumPy agree on every
// offset without padding rules (tests/test_build.py checks the offsets against a C
// compiler). Strides are in elements and 64-bit: batch * heads * seqlen * head_dim
// exceeds 2^31 in real use.
#pragma once

typedef long long cf_i64;
typedef unsigned long long cf_u64;
typedef unsigned int cf_u32;

struct Params {
    // ---- inputs (element type per variant; bias in its own dtype) ----
    const void* q;
    const void* k;
    const void* v;
    const void* dout;
    const void* bias;
    const unsigned char* mask;
    const float* alibi;
    const int* cu_seqlens_q;
    const int* cu_seqlens_k;
    // Dropout's (seed, offset) read on the device at launch, or null to use `seed` and
    // `dropout_offset` below: a captured CUDA graph replays with whatever the state holds
    // then, so a generator that advances it between replays draws a fresh mask each time.
    const cf_u64* rng_state;
    // ---- forward outputs; `out` and `lse` are inputs of the backward ----
    void* out;
    float* lse;
    // ---- backward outputs and fp32 workspaces ----
    void* dq;
    void* dk;
    void* dv;
    float* dq_accum;
    float* dsum;
    float* lse_log2;
    float* dbias_full;
    // Block-sparse attention (kernels compiled with CF_BLOCK_SPARSE): for each (batch, head,
    // query block) the number of key blocks it computes and their indices, ascending; and
    // the transposed lists, per key block, for the dK/dV kernels. int32, contiguous:
    // counts [bs_batches][bs_heads][blocks], indices [...][blocks][other blocks]; a batch
    // or head dimension of 1 is broadcast.
    const int* bs_kv_count;
    const int* bs_kv_index;
    const int* bs_q_count;
    const int* bs_q_index;
    // ---- strides (elements). Rows of a packed (varlen) batch use the row stride alone. ----
    cf_i64 q_batch_stride;
    cf_i64 q_row_stride;
    cf_i64 q_head_stride;
    cf_i64 k_batch_stride;
    cf_i64 k_row_stride;
    cf_i64 k_head_stride;
    cf_i64 v_batch_stride;
    cf_i64 v_row_stride;
    cf_i64 v_head_stride;
    cf_i64 o_batch_stride;
    cf_i64 o_row_stride;
    cf_i64 o_head_stride;
    cf_i64 do_batch_stride;
    cf_i64 do_row_stride;
    cf_i64 do_head_stride;
    cf_i64 dq_batch_stride;
    cf_i64 dq_row_stride;
    cf_i64 dq_head_stride;
    cf_i64 dk_batch_stride;
    cf_i64 dk_row_stride;
    cf_i64 dk_head_stride;
    cf_i64 dv_batch_stride;
    cf_i64 dv_row_stride;
    cf_i64 dv_head_stride;
    // lse as the caller holds it: [batch][head][row] (varlen: [head][packed row]).
    cf_i64 lse_batch_stride;
    cf_i64 lse_head_stride;
    // The backward's row workspaces (lse_log2, dsum; dq_accum times head_dim_padded).
    cf_i64 ws_batch_stride;
    cf_i64 ws_head_stride;
    // Bias and mask, broadcast dimensions having stride 0: [batch][head][row][col].
    cf_i64 bias_batch_stride;
    cf_i64 bias_head_stride;
    cf_i64 bias_row_stride;
    cf_i64 bias_col_stride;
    cf_i64 mask_batch_stride;
    cf_i64 mask_head_stride;
    cf_i64 mask_row_stride;
    cf_i64 mask_col_stride;
    // dbias_full is a dense fp32 [batch][head][seqlen_q][seqlen_k] gradient of the scores.
    cf_i64 dbias_batch_stride;
    cf_i64 dbias_head_stride;
    cf_i64 dbias_row_stride;
    cf_i64 alibi_batch_stride;
    cf_u64 seed;
    // ---- 4-byte fields ----
    int batch;
    int num_heads;
    int num_heads_kv;
    int head_dim;
    int seqlen_q;
    int seqlen_k;
    int num_m_blocks;
    int num_n_blocks;
    int window_left;
    int window_right;
    int bottom_right;
    int flags;
    int aligned;
    float softmax_scale;
    float scale_log2;
    float softcap;
    float dropout_scale;
    cf_u32 dropout_threshold;
    cf_u32 dropout_offset;
    // Global positions of query row 0 and key row 0 (a chunk of a longer sequence): they
    // shift the aligned diagonal (causal, windows, ALiBi) and dropout's coordinates.
    int q_position;
    int k_position;
    // Block-sparse lists' dimensions and block size (rows of a query block, keys of a key
    // block: multiples of the kernels' tiles, chosen so by cuflash/_tiles.py).
    int bs_batches;
    int bs_heads;
    int bs_q_blocks;
    int bs_k_blocks;
    int bs_block_q;
    int bs_block_k;
    int pad0;
};

// Params::flags
#define CF_HAS_BIAS 1
#define CF_HAS_MASK 2
#define CF_HAS_ALIBI 4
#define CF_HAS_SOFTCAP 8
#define CF_HAS_DROPOUT 16
#define CF_IS_VARLEN 32
#define CF_DQ_ATOMIC 64
#define CF_WANT_DBIAS 128
#define CF_BIAS_IS_BF16 256
#define CF_BIAS_IS_F16 512
#define CF_BIAS_IS_F32 1024

// Params::aligned: a set bit means that tensor's rows may be moved in 16-byte vectors
// (base pointer, every stride and head_dim are multiples of 16 bytes).
#define CF_ALIGN_Q 1
#define CF_ALIGN_K 2
#define CF_ALIGN_V 4
#define CF_ALIGN_O 8
#define CF_ALIGN_DO 16
#define CF_ALIGN_DQ 32
#define CF_ALIGN_DK 64
#define CF_ALIGN_DV 128
