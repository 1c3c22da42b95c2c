// The parameter block of the KV-cache kernels (flash_decode.cu), passed by value.
//
// Filled on the host by cuflash/_kvcache.py, which builds its NumPy record type by
// reading this file with the same parser as params.h: one field per line, written
// `TYPE NAME;`, 8-byte fields first and 4-byte fields after them (tests/test_kvcache.py
// checks every offset against a C compiler). Strides are in elements and 64-bit.
//
// Key rows are addressed in the cache's own (absolute) coordinates: row r of sequence b
// is slot r of cache batch entry cache_batch_idx[b] (contiguous cache), or slot
// r % page_size of page block_table[b][r / page_size] (paged cache). A sequence holds the
// rows [cache_leftpad[b], cache_seqlens[b] + seqlen_new); the new keys go to rows
// cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1.
#pragma once
#include "params.h"

struct DecodeParams {
    // ---- inputs ----
    const void* q;
    void* q_rot;
    void* k_cache;
    void* v_cache;
    const void* k_new;
    const void* v_new;
    const int* cache_seqlens;
    const int* block_table;
    const int* cache_batch_idx;
    const int* cache_leftpad;
    const void* rotary_cos;
    const void* rotary_sin;
    const float* alibi;
    // ---- outputs and fp32 workspaces of the split-KV path ----
    void* out;
    float* lse;
    float* o_accum;
    float* lse_accum;
    // ---- strides (elements) ----
    cf_i64 q_batch_stride;
    cf_i64 q_row_stride;
    cf_i64 q_head_stride;
    cf_i64 qr_batch_stride;
    cf_i64 qr_row_stride;
    cf_i64 qr_head_stride;
    // Contiguous cache: batch entry; paged cache: page.
    cf_i64 kc_batch_stride;
    cf_i64 kc_row_stride;
    cf_i64 kc_head_stride;
    cf_i64 vc_batch_stride;
    cf_i64 vc_row_stride;
    cf_i64 vc_head_stride;
    cf_i64 kn_batch_stride;
    cf_i64 kn_row_stride;
    cf_i64 kn_head_stride;
    cf_i64 vn_batch_stride;
    cf_i64 vn_row_stride;
    cf_i64 vn_head_stride;
    cf_i64 o_batch_stride;
    cf_i64 o_row_stride;
    cf_i64 o_head_stride;
    cf_i64 lse_batch_stride;
    cf_i64 lse_head_stride;
    cf_i64 block_table_batch_stride;
    cf_i64 rotary_row_stride;
    cf_i64 alibi_batch_stride;
    // ---- 4-byte fields ----
    int batch;
    int seqlen_q;
    int num_heads;
    int num_heads_kv;
    int group;
    int head_dim;
    int seqlen_new;
    // Rows one sequence can hold: seqlen of a contiguous cache, pages per sequence times
    // page_size of a paged one. No kernel reads or writes a row at or past it.
    int capacity;
    int page_size;
    int num_pages;
    int batch_cache;
    int num_splits;
    // Query rows per (batch, kv head): group * seqlen_q, ordered query-major (row
    // m = i * group + head within the group).
    int rows_per_head;
    int num_m_blocks;
    int window_left;
    int window_right;
    int flags;
    int rotary_dim;
    int seqlen_ro;
    // cache_seqlens when it is one number for the whole batch (cache_seqlens == nullptr).
    int seqlens_const;
    float softmax_scale;
    float scale_log2;
    float softcap;
    int pad0;
};

// DecodeParams::flags
#define CFD_PAGED 1
#define CFD_APPEND 2
#define CFD_ROTARY 4
#define CFD_ROTARY_INTERLEAVED 8
#define CFD_ROTARY_Q_SEQUENTIAL 16
#define CFD_ROTARY_F32 32
#define CFD_SOFTCAP 64
#define CFD_ALIBI 128
