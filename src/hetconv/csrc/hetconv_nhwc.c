/*
 * hetconv native CPU kernel, channels-last (NHWC) variant: the HetConv forward
 * pass and its weight gradient vectorised over output channels, for wide
 * layers (hetconv_cpu.c vectorises over output pixels, for narrow ones).
 *
 * The same formulation as hetconv_cpu.c, with exactly FL_HC multiply-adds: the
 * centre taps of all kernels form one dense (N x M) pointwise matrix and the
 * other taps touch only the Mk = M/P channels of each filter's class.
 *
 * Vectorisation.  A register holds 16 consecutive filters (n0 .. n0 + 15).  At
 * step j of a non-centre tap, lane l needs channel chan[class(n0 + l)][j] of
 * the input pixel.  Two patterns make that one cheap load:
 *   "shifted" with P | 16: class(n) = n % P and chan[k][j] = j * P + k, so the
 *     16 lanes want channels j*P .. j*P + P - 1 repeated 16 / P times: a
 *     broadcast of P floats (lw = P, step ts = P, offset toff = 0).
 *   "shifted" with 16 | P (32, 64, ...): the 16 lanes want 16 consecutive classes,
 *     channels j*P + c0 .. j*P + c0 + 15 (c0: the first lane's class): a load of 16
 *     floats (lw = 16, ts = P, toff = c0; c0 differs from one 16 filters to the next, so
 *     a block's vectors are P filters apart, where the classes repeat: vs = P below).
 *   "blocked" with 16 | N / P: a block's 16 filters share one class k and
 *     chan[k][j] = k * Mk + j: a broadcast of one float (lw = 1, ts = 1,
 *     toff = k * Mk).
 * The Python side (hetconv/native.py) packs the weights so lane l of step j
 * holds the weight of exactly that channel, and checks that the layer is one
 * of the two cases.  The centre taps read all M channels: a broadcast of one
 * float per channel.
 *
 * Micro-kernel: R output pixels x V vectors (16V filters) in R*V accumulators
 * (V = 4, R = 6: 24 registers; each step loads V weight vectors and R input
 * broadcasts for R*V FMAs).  Pixels are addressed through a pointer per pixel
 * and tap, so padding is a pointer to a row of zeros (no padded copy of the
 * input), any stride works, and a tap that leaves the image for all R pixels
 * of a tile is skipped.  For small planes the pixels of a tile are the same
 * position in R images (position-major order), so border taps skip exactly.
 *
 * Blocks of V vectors.  Vector v of a block holds filters n0 + v * vs .. n0 + v * vs + 15:
 * vs = 16 (consecutive filters) except for "shifted" with 16 | P, where vs = P: filters n
 * and n + P have the same class, so the block's vectors read the same 16 channels (one
 * load per pixel and step for all V) - with consecutive vectors (16 classes each) every
 * block would be one vector.
 *
 * 16 -> 16 channels (ResNet-56's first stage).  A block of one vector would load a weight
 * vector per 8 multiply-adds in tiles of 8 pixels and run 4-step tap loops (P = 4): 20% of
 * the FMA rate, oneDNN's dense speed.  At stride 1 the forward (and so the input gradient)
 * takes each row's interior stretches in tiles of 24 pixels addressed from one base
 * (nh_tile16: a pixel's rows are 16 floats apart), its taps' steps as one loop, and the
 * weight gradient sums the interior pixels' 8 taps and centre in one to four passes of up
 * to 24 accumulators (nh_wtile16).  Paired in one process (twenty-sixth session): the
 * forward 0.63-0.80x the time, a training step 0.70-0.89x (P = 2 .. 16).
 *
 * Output stores.  The forward writes y with non-temporal stores (_mm512_stream_ps) where a
 * pixel's row of a block's filters is 64-byte aligned (y from torch is; n0 of a "shifted"
 * 16 | P block may not be), and ends each run with an sfence.  No cache line of y is read
 * for ownership first, and y does not push the input and the weights out of the caches.
 * Paired A/B in one process (docs/performance.md, fourteenth session): 0.91-0.98x the time
 * per layer, batch 1 to 64, inference and training; VGG-16 0.95-0.99x.
 *
 * Packed weights (filter blocks in the layout's order; p0_b: the 16 V lanes of the blocks
 * before b):
 *   w1p  block b at p0_b * M:        (M, 16 V_b)     centre taps
 *   wkp  block b at p0_b * T * Mk:   (T, Mk, 16 V_b) the T = Kh*Kw - 1 other taps
 *   bias (N) or NULL
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define NH_R4 6   /* pixels per tile with 4 vectors per block */
#define NH_RMAX 8 /* pixels per tile at most */
#define NH_KKMAX 49
#define NH_JR4 6  /* weight-gradient steps per tile with 4 vectors */
#define NH_JRMAX 8
#define NH_PIXMAJOR_MAX_WBYTES (512 * 1024) /* pixel-major forward items up to this much weight */
#define NH_PREFETCH_MIN_BYTES (2L << 20) /* inputs above this prefetch ahead (forward) */
#define NH_WPREFETCH 4 /* forward: weights prefetched this many steps ahead (see nh_tile) */
#define NH_WFAR 24 /* ... and this many into L2, in calls of at most: */
#define NH_WFAR_MAX_PIXELS 24 /* output pixels (see nh_tile) */
#define NH_ITEMS_PER_THREAD 8 /* forward work items per thread, taken dynamically */
#define NH_DYNAMIC_MIN_PIXELS 64 /* ... for calls of at least this many output pixels */
#define NH_PIXCHUNK 96 /* pixels per block in a pixel-major item (a multiple of 24) */
#define NH_PIXMAJOR_MIN_RUN 384 /* ... and 4 x this many pixels per thread at least (else
                                 * each item's pass over all blocks' weights costs more) */

static inline int nh_rows(int V) { return V >= 4 ? NH_R4 : NH_RMAX; }

/* Size of a tile (of full, or 4 or 2 when fewer are left) for the next n pixels or steps: a
 * tile's pixels / steps past the end repeat the last one and are computed in vain (7x7 planes
 * at batch 1, 49 = 8 x 6 + 1, computed 54 pixels with tiles of 6 only; a position of 16
 * images 18; 6-step weight-gradient tiles 12.5% of the taps at M/P = 16 or 32, 8-step ones
 * half at M/P = 4).  A forward caller takes at most that many pixels. */
static inline int nh_part(int full, long n) {
    return n >= full - 1 ? full : n > 2 ? 4 : 2;
}
static inline int nh_tile_rows(int V, long n) { return nh_part(nh_rows(V), n); }
/* Weight-gradient steps per tile.  With 6-step tiles, 8 steps left go as 4 + 4, not 6 + 2 (a
 * 2-step tile has 8 accumulators for V = 4 loads per pixel): M/P = 32 is 6 x 5 + 2, M = 128
 * is 6 x 20 + 8.  Paired on the second Intel host: 0.98-1.00x the weight gradient's time. */
static inline int nh_wsteps(int V, int rem) {
    if (V >= 4 && rem == 8) return 4;
    return nh_part(V >= 4 ? NH_JR4 : NH_JRMAX, rem);
}

typedef struct {
    int B, M, N, H, W, Ho, Wo, kh, kw, s, ph, pw, Mk, ts, lw, posmajor;
    int up;  /* > 1: transposed strided convolution, always in residue order (see
              * nh_residue_tile; hetconv_nhwc_forward refuses any other order with it) */
    int vs;  /* filters from one vector of a block to the next (16, or P: see the top) */
    int stream;  /* forward: write y with non-temporal stores (see "Output stores") */
    int pool;    /* forward: 2 = a 2x2 max-pool of stride 2 fused (see nh_pooled), else 0 */
    int wfar;    /* forward: also prefetch the weights NH_WFAR steps ahead into L2 (see nh_tile) */
} nh_geom;

/* Pixel orders (posmajor): 0 image-major (b, oh, ow); 1 position-major (oh, ow, b); 2
 * residue-major (b, oh, ow mod up, ow): within a row, the columns of one residue modulo up
 * in turn (the transposed strided case: consecutive pixels then read consecutive input
 * columns through the same taps). */
#define NH_ORDER_RESIDUE 2

/* a / up into *q when up divides a (C's / and %; a may be negative), else 0 (*q unset).
 * up = 2, every strided layer's input gradient here, by a shift and a mask (for negative a
 * an arithmetic shift, as gcc and clang do: exact here, a being even): the residue order's
 * tile set-up (below) divided 30-odd times per tile before. */
static inline int nh_exact_div(int a, int up, int *q) {
    if (up == 2) { *q = a >> 1; return !(a & 1); }
    if (a % up) return 0;
    *q = a / up;
    return 1;
}

/* Columns c, c + up, c + 2 up, ... of an output row of Wo (c = 0 .. up - 1: a whole residue
 * class; any other c: what is left of its class from column c on). */
static inline int nh_residue_count(int Wo, int up, int c) {
    return (up == 2 ? (Wo - 1 - c) >> 1 : (Wo - 1 - c) / up) + 1;
}

/* Output pixel q (in the layer's pixel order) -> image, row, column. */
static inline void nh_pixel(const nh_geom *g, long q, int *b, int *oh, int *ow) {
    const int hw = g->Ho * g->Wo;
    int pos;
    if (g->posmajor == 1) { pos = (int)(q / g->B); *b = (int)(q % g->B); }
    else { *b = (int)(q / hw); pos = (int)(q % hw); }
    *oh = pos / g->Wo; *ow = pos % g->Wo;
    if (g->posmajor == NH_ORDER_RESIDUE) {  /* the j-th column of the row in residue order */
        int j = *ow, c = 0;
        for (int cnt; j >= (cnt = nh_residue_count(g->Wo, g->up, c)); ++c) j -= cnt;
        *ow = c + j * g->up;
    }
}

/* The pixel after (b, oh, ow) in the layer's pixel order (nh_pixel's inverse, stepped), for
 * the image- and position-major orders (a residue-order tile steps its own columns). */
static inline void nh_next(const nh_geom *g, int *b, int *oh, int *ow) {
    if (g->posmajor) {
        if (++*b == g->B) { *b = 0; if (++*ow == g->Wo) { *ow = 0; ++*oh; } }
    } else if (++*ow == g->Wo) {
        *ow = 0;
        if (++*oh == g->Ho) { *oh = 0; ++*b; }
    }
}

/* Row of channel values that tap (u, v) of output pixel (b, oh, ow) reads, or NULL (padding).
 * For up = 1 only: a transposed strided layer's taps are set up by nh_residue_tile. */
static inline const float *nh_tap(const nh_geom *g, const float *x, int b, int oh, int ow,
                                  int u, int v) {
    const int ih = oh * g->s - g->ph + u, iw = ow * g->s - g->pw + v;
    if (ih < 0 || ih >= g->H || iw < 0 || iw >= g->W) return NULL;
    return x + (((size_t)b * g->H + ih) * g->W + iw) * (size_t)g->M;
}

/* Offset of tap t from the top-left tap, for a pixel whose taps are all inside the image. */
static inline ptrdiff_t nh_toff(const nh_geom *g, int t) {
    return ((ptrdiff_t)(t / g->kw) * g->W + t % g->kw) * g->M;
}

/* The top-left tap's row of output pixel (b, oh, ow) when every tap is inside the image
 * (tap t is then nh_toff(t) from it), else NULL (look the taps up with nh_tap). */
static inline const float *nh_base(const nh_geom *g, const float *x, int b, int oh, int ow) {
    const int ih0 = oh * g->s - g->ph, iw0 = ow * g->s - g->pw;
    if (ih0 < 0 || ih0 + g->kh > g->H || iw0 < 0 || iw0 + g->kw > g->W)
        return NULL;
    return x + (((size_t)b * g->H + ih0) * g->W + iw0) * (size_t)g->M;
}

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) __m512 nh_load(const float *p, const int lw) {
    switch (lw) {
        case 1: return _mm512_set1_ps(*p);
        case 2: { double d; memcpy(&d, p, sizeof d); return _mm512_castpd_ps(_mm512_set1_pd(d)); }
        case 4: return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
        case 8: return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
        default: return _mm512_loadu_ps(p);
    }
}

/* One tile: R pixels (px[t * R + r]: row read by tap t; NULL rows were replaced by the zero
 * row and flagged in live[t]) x V vectors.  A block's weights (64 KB at 128 channels and
 * P = 8) do not fit L1 and stream from L2 for every tile; each step prefetches the weights
 * of the step NH_WPREFETCH ahead (past the end of a tap's or the centre's steps: the next
 * ones, or harmless addresses: a prefetch never faults).  Paired in one process on the second
 * Intel host: 0.95-0.99x the time on 128-512-channel layers, inference and training
 * (docs/performance.md, fifteenth session; not measured on the AMD host).
 * far (calls of at most NH_WFAR_MAX_PIXELS output pixels, blocks of 4 vectors): each step
 * also prefetches into L2 the weights NH_WFAR steps ahead.  So few pixels reuse a block's
 * weights a tile or two, so they stream from L3 or memory once per call (VGG-16's 4x4 and
 * 2x2 layers at batch 1: 3 MB each at P = 4), and 4 steps' warning does not cover that
 * latency.  Paired in one process (twenty-fourth session): VGG-16 at batch 1 P4 0.92-0.93x,
 * P1 0.89x; in every call (no gate) batch 16-64 took 1.02-1.10x, the prefetches then
 * competing with the loads for weights already in L2; gated at 64 pixels instead of 24,
 * batch 4 took 1.03x. */
static inline __attribute__((always_inline)) void nh_tile(
        const int R, const int V, const int lw, const int far, const nh_geom *g,
        const float *const *px, const unsigned char *live, const float *w1,
        const float *wk, int toff, const float *bias, float *const *yo,
        const float *const *ro, int relu, const unsigned char *first) {
    const int KK = g->kh * g->kw, centre = (g->kh / 2) * g->kw + g->kw / 2;
    const int M = g->M, Mk = g->Mk, ts = g->ts, VW = 16 * V, vs = g->vs;
    __m512 acc[NH_RMAX][4];  /* fixed sizes (not VLAs), so they become registers */
    _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) {
        const __m512 b0 = bias ? _mm512_loadu_ps(bias + vs * v) : _mm512_setzero_ps();
        _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) acc[r][v] = b0;
    }
    if (live[centre]) {
        const float *p[NH_RMAX];
        _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) p[r] = px[centre * R + r];
        for (int c = 0; c < M; ++c) {
            __m512 w[4];
            _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
                _mm_prefetch((const char *)(w1 + (size_t)(c + NH_WPREFETCH) * VW + 16 * v), _MM_HINT_T0);
            if (far)
                _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
                    _mm_prefetch((const char *)(w1 + (size_t)(c + NH_WFAR) * VW + 16 * v), _MM_HINT_T1);
            _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) w[v] = _mm512_loadu_ps(w1 + (size_t)c * VW + 16 * v);
            _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
                const __m512 xv = _mm512_set1_ps(p[r][c]);
                _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xv, w[v], acc[r][v]);
            }
        }
    }
    for (int t = 0, e = 0; t < KK; ++t) {
        if (t == centre) continue;
        const float *wt = wk + (size_t)e * Mk * VW;
        ++e;
        if (!live[t]) continue;
        const float *p[NH_RMAX];
        _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) p[r] = px[t * R + r] + toff;
        for (int j = 0; j < Mk; ++j) {
            __m512 w[4];
            _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
                _mm_prefetch((const char *)(wt + (size_t)(j + NH_WPREFETCH) * VW + 16 * v), _MM_HINT_T0);
            if (far)
                _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)
                    _mm_prefetch((const char *)(wt + (size_t)(j + NH_WFAR) * VW + 16 * v), _MM_HINT_T1);
            _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) w[v] = _mm512_loadu_ps(wt + (size_t)j * VW + 16 * v);
            _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
                const __m512 xv = nh_load(p[r] + (size_t)j * ts, lw);
                _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xv, w[v], acc[r][v]);
            }
        }
    }
    const __m512 zero = _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
        if (!yo[r]) continue;
        /* vs * v floats are whole cache lines: the row's alignment is its vectors' */
        const int stream_r = g->stream && !((uintptr_t)yo[r] & 63);
        _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) {
            __m512 a = acc[r][v];
            if (ro[r]) a = _mm512_add_ps(a, _mm512_loadu_ps(ro[r] + vs * v));
            if (relu) a = _mm512_max_ps(a, zero);
            /* pooled: the window's first pixel stores, the others keep the maximum */
            if (g->pool && !first[r]) a = _mm512_max_ps(a, _mm512_loadu_ps(yo[r] + vs * v));
            if (stream_r) _mm512_stream_ps(yo[r] + vs * v, a);
            else _mm512_storeu_ps(yo[r] + vs * v, a);
        }
    }
}

/* nh_tile with R pixels (the full tile FULL, or the tails' 4 and 2), V vectors and the far
 * weight prefetch FAR (blocks of 4 vectors only: the other widths are rare in calls this small) */
#define NH_TILE_R(FULL, V, LW, FAR)                                                         \
    do {                                                                                    \
        if (R == 2) nh_tile(2, V, LW, FAR, g, px, live, w1, wk, toff, bias, yo, ro, relu, first); \
        else if (R == 4)                                                                    \
            nh_tile(4, V, LW, FAR, g, px, live, w1, wk, toff, bias, yo, ro, relu, first);   \
        else nh_tile(FULL, V, LW, FAR, g, px, live, w1, wk, toff, bias, yo, ro, relu, first); \
    } while (0)
#define NH_TILE_CASES(LW)                                                                   \
    switch (V) {                                                                            \
        case 4:                                                                             \
            if (g->wfar) NH_TILE_R(NH_R4, 4, LW, 1);                                        \
            else NH_TILE_R(NH_R4, 4, LW, 0);                                                \
            break;                                                                          \
        case 3: NH_TILE_R(NH_RMAX, 3, LW, 0); break;                                        \
        case 2: NH_TILE_R(NH_RMAX, 2, LW, 0); break;                                        \
        default: NH_TILE_R(NH_RMAX, 1, LW, 0); break;                                       \
    }

static void nh_tile_any(int V, int R, const nh_geom *g, const float *const *px,
                        const unsigned char *live,
                        const float *w1, const float *wk, int toff, const float *bias,
                        float *const *yo, const float *const *ro, int relu,
                        const unsigned char *first) {
    switch (g->lw) {
        case 1: NH_TILE_CASES(1) break;
        case 2: NH_TILE_CASES(2) break;
        case 4: NH_TILE_CASES(4) break;
        case 8: NH_TILE_CASES(8) break;
        default: NH_TILE_CASES(16) break;
    }
}

/* 16 -> 16 channels at stride 1 (ResNet-56's first stage, and its input gradient): a block
 * of one vector, where nh_tile's 8 pixels load a weight vector per 8 multiply-adds.  This
 * tile takes NH_R16 consecutive pixels of one output row, every tap inside the image, so
 * pixel r's rows are the first pixel's plus 16 r floats (input and output alike): one base
 * register for all of them.  koff: the taps' steps as one list of offsets from the
 * top-left tap (see hetconv_nhwc_forward). */
#define NH_R16 24
static inline __attribute__((always_inline)) void nh_tile16(
        const int lw, const nh_geom *g, const float *b0, const ptrdiff_t *toffs,
        const int *koff, const float *w1, const float *wk, int toff, const float *bias,
        float *y0, const float *r0, int relu) {
    const int KK = g->kh * g->kw, centre = (g->kh / 2) * g->kw + g->kw / 2;
    const int S = (KK - 1) * g->Mk;
    __m512 acc[NH_R16];
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    _Pragma("GCC unroll 32") for (int r = 0; r < NH_R16; ++r) acc[r] = b;
    const float *pc = b0 + toffs[centre];
    for (int c = 0; c < 16; ++c) {
        const __m512 w = _mm512_loadu_ps(w1 + 16 * c);
        _Pragma("GCC unroll 32") for (int r = 0; r < NH_R16; ++r)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(pc[16 * r + c]), w, acc[r]);
    }
    const float *pt = b0 + toff;
    for (int k = 0; k < S; ++k) {
        const __m512 w = _mm512_loadu_ps(wk + 16 * k);
        const float *p = pt + koff[k];
        _Pragma("GCC unroll 32") for (int r = 0; r < NH_R16; ++r)
            acc[r] = _mm512_fmadd_ps(nh_load(p + 16 * r, lw), w, acc[r]);
    }
    const __m512 zero = _mm512_setzero_ps();
    const int stream = g->stream && !((uintptr_t)y0 & 63);
    _Pragma("GCC unroll 32") for (int r = 0; r < NH_R16; ++r) {
        __m512 a = acc[r];
        if (r0) a = _mm512_add_ps(a, _mm512_loadu_ps(r0 + 16 * r));
        if (relu) a = _mm512_max_ps(a, zero);
        if (stream) _mm512_stream_ps(y0 + 16 * r, a);
        else _mm512_storeu_ps(y0 + 16 * r, a);
    }
}

static void nh_tile16_any(const nh_geom *g, const float *b0, const ptrdiff_t *toffs,
                          const int *koff, const float *w1, const float *wk, int toff,
                          const float *bias, float *y0, const float *r0, int relu) {
    switch (g->lw) {
        case 1: nh_tile16(1, g, b0, toffs, koff, w1, wk, toff, bias, y0, r0, relu); break;
        case 2: nh_tile16(2, g, b0, toffs, koff, w1, wk, toff, bias, y0, r0, relu); break;
        case 4: nh_tile16(4, g, b0, toffs, koff, w1, wk, toff, bias, y0, r0, relu); break;
        case 8: nh_tile16(8, g, b0, toffs, koff, w1, wk, toff, bias, y0, r0, relu); break;
        default: nh_tile16(16, g, b0, toffs, koff, w1, wk, toff, bias, y0, r0, relu); break;
    }
}
#define NH_HAS_TILE16 1
#else
/* Portable scalar version of the same tile (correct, not fast). */
static void nh_tile_any(int V, int R, const nh_geom *g, const float *const *px,
                        const unsigned char *live,
                        const float *w1, const float *wk, int toff, const float *bias,
                        float *const *yo, const float *const *ro, int relu,
                        const unsigned char *first) {
    const int KK = g->kh * g->kw, centre = (g->kh / 2) * g->kw + g->kw / 2;
    const int VW = 16 * V;
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
        if (!yo[r]) continue;
        for (int i = 0; i < VW; ++i) {
            const int f = i / 16 * g->vs + i % 16;  /* lane i's filter, from the block's first */
            float a = bias ? bias[f] : 0.f;
            if (live[centre])
                for (int c = 0; c < g->M; ++c) a += px[centre * R + r][c] * w1[(size_t)c * VW + i];
            for (int t = 0, e = 0; t < KK; ++t) {
                if (t == centre) continue;
                const float *wt = wk + (size_t)e * g->Mk * VW;
                ++e;
                if (!live[t]) continue;
                for (int j = 0; j < g->Mk; ++j)
                    a += px[t * R + r][toff + j * g->ts + i % g->lw] * wt[(size_t)j * VW + i];
            }
            if (ro[r]) a += ro[r][f];
            if (relu && a < 0.f) a = 0.f;
            if (g->pool && !first[r] && yo[r][f] > a) a = yo[r][f];
            yo[r][f] = a;
        }
    }
}
#endif

/* The filter blocks cover filters and packed lanes inside [0, N) (they are the caller's). */
static int nh_check_blocks(const nh_geom *g, int nfb, const int *blk_n0, const int *blk_p0,
                           const int *blk_v) {
    if (nfb < 1 || !blk_n0 || !blk_p0 || !blk_v) return -1;
    for (int fb = 0; fb < nfb; ++fb) {
        const int V = blk_v[fb], n0 = blk_n0[fb], p0 = blk_p0[fb];
        if (V < 1 || V > 4 || n0 < 0 || p0 < 0 || p0 + 16 * V > g->N
            || n0 + (V - 1) * g->vs + 16 > g->N)
            return -1;
    }
    return 0;
}

static int nh_check(const nh_geom *g) {
    if (g->B < 0 || g->M < 1 || g->N < 16 || g->N % 16 || g->H < 1 || g->W < 1) return -1;
    if (g->kh * g->kw > NH_KKMAX || g->kh % 2 == 0 || g->kw % 2 == 0) return -1;
    if (g->s < 1 || g->Mk < 0 || g->ts < 1 || g->vs < 16 || g->vs % 16) return -1;
    if (g->lw != 1 && g->lw != 2 && g->lw != 4 && g->lw != 8 && g->lw != 16) return -1;
    return 0;
}

/* A residue-order tile (transposed strided layer, up > 1): pixels (b, oh, ow + r * up) up
 * to lim (the caller cuts it at the end of the row's residue class).  A tap reads, for all
 * of them or for none, input row (oh - ph + u) / up and columns (ow - pw + v) / up + r
 * (consecutive), the ones inside the image. */
static void nh_residue_tile(const nh_geom *g, const float *x, float *y, const float *res,
                            const float *zero, int n0, int b, int oh, int ow, int Rt, long q0,
                            long lim, const float **px, unsigned char *live, float **yo,
                            const float **ro) {
    const int up = g->up, n = (int)(lim - q0);
    for (int r = 0; r < Rt; ++r) {
        const int rr = r < n ? r : n - 1;  /* tail: the last pixel again, not stored */
        const size_t o = (((size_t)b * g->Ho + oh) * g->Wo + ow + rr * up) * (size_t)g->N + n0;
        yo[r] = r < n ? y + o : NULL;
        ro[r] = (res && yo[r]) ? res + o : NULL;
    }
    /* the row of kernel row u and the first column of kernel column v: per u and per v,
     * not per tap, and only the live taps' rows (a residue class has 1-4 of 9).  Paired on
     * the second Intel host: 0.95-0.98x the stride-2 input gradient's time, the live taps
     * only another 0.96-0.99x (docs/performance.md, sixteenth session) */
    const int kh = g->kh, kw = g->kw, M = g->M, W = g->W;
    int col[NH_KKMAX], cok[NH_KKMAX];
    for (int v = 0; v < kw; ++v) cok[v] = nh_exact_div(ow - g->pw + v, up, &col[v]);
    for (int u = 0, t = 0; u < kh; ++u) {
        int ih;
        const int rok = nh_exact_div(oh - g->ph + u, up, &ih) && ih >= 0 && ih < g->H;
        if (!rok) {  /* a dead kernel row: its taps stay dead, their rows unset (unread) */
            t += kw;
            continue;
        }
        const float *row = x + ((size_t)b * g->H + ih) * W * (size_t)M;
        for (int v = 0; v < kw; ++v, ++t) {
            if (!cok[v]) continue;  /* likewise a dead kernel column */
            unsigned char any = 0;
            for (int r = 0; r < Rt; ++r) {
                const int c = col[v] + (r < n ? r : n - 1);  /* consecutive input columns */
                const int in = c >= 0 && c < W;
                px[t * Rt + r] = in ? row + (size_t)c * M : zero;
                any |= (unsigned char)in;
            }
            if (any) live[t] = 1;
        }
    }
}

/* Into L2: the input the pixel one output row below (b, oh, ow) reads and this one does not
 * (s x s pixels: its taps' new rows and columns), so a large input streams in from memory
 * ahead of its tiles. */
static inline void nh_prefetch_next_row(const nh_geom *g, const float *x, int b, int oh,
                                        int ow) {
#if defined(__AVX512F__)
    if (oh + 1 >= g->Ho) return;
    const int ih0 = (oh + 1) * g->s - g->ph + g->kh - g->s, iw0 = ow * g->s - g->pw + g->kw - g->s;
    const size_t bytes = (size_t)g->M * sizeof(float);
    for (int u = 0; u < g->s; ++u) {
        const int ih = ih0 + u;
        if (ih < 0 || ih >= g->H) continue;
        for (int v = 0; v < g->s; ++v) {
            const int iw = iw0 + v;
            if (iw < 0 || iw >= g->W) continue;
            const char *p = (const char *)(x + (((size_t)b * g->H + ih) * g->W + iw) * g->M);
            for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
        }
    }
#else
    (void)g; (void)x; (void)b; (void)oh; (void)ow;
#endif
}

/* With a 2x2 max-pool of stride 2 fused (g->pool; Ho and Wo even): where output pixel
 * (b, oh, ow)'s filters from n0 go, its window's row of the pooled y (B, Ho/2, Wo/2, N), and
 * in *first whether it is the window's first pixel in the pixel order (image- or
 * position-major: the top-left one), which stores; the window's other pixels take the
 * maximum with what is there.  A window's four pixels are in one run (see per_run), so one
 * thread computes them, in pixel order. */
static inline float *nh_pooled(const nh_geom *g, float *y, int b, int oh, int ow, int n0,
                               unsigned char *first) {
    *first = !(oh & 1) && !(ow & 1);
    return y + (((size_t)b * (g->Ho / 2) + oh / 2) * (g->Wo / 2) + ow / 2) * (size_t)g->N + n0;
}

/* Filter block fb of the forward over output pixels [q_begin, q_end), tile by tile. */
static void nh_fwd_run(const nh_geom *gp, const float *x, float *y, const float *zero,
                       const ptrdiff_t *toffs, const int *koff, int fb, long q_begin, long q_end,
                       const int *blk_n0, const int *blk_p0, const int *blk_v,
                       const int *blk_toff, const float *w1p, const float *wkp,
                       const float *bias, const float *res, int relu, int prefetch) {
    const nh_geom g = *gp;
    const int M = g.M, N = g.N, H = g.H, W = g.W, kw = g.kw;
    const int posmajor = g.posmajor, Mk = g.Mk, B = g.B;
    const int KK = g.kh * kw, T = KK - 1;
    const int V = blk_v[fb], n0 = blk_n0[fb], p0 = blk_p0[fb], Rmax = nh_rows(V);
    const float *w1 = w1p + (size_t)p0 * M, *wk = wkp + (size_t)p0 * T * Mk;
    const float *bb = bias ? bias + n0 : NULL;
    const float *px[NH_KKMAX * NH_RMAX];
    float *yo[NH_RMAX];
    const float *ro[NH_RMAX];
    unsigned char live[NH_KKMAX], first[NH_RMAX] = {0};
#ifdef NH_HAS_TILE16
    /* 16 -> 16 at stride 1, image-major, unpooled: the rows' regular stretches in tiles of
     * NH_R16 (see nh_tile16) */
    const int wide16 = koff && V == 1 && M == 16 && N == 16 && g.s == 1 && g.up == 1
        && !g.pool && posmajor == 0 && g.Wo >= NH_R16 + 1;
#endif
    for (long q0 = q_begin, lim; q0 < q_end; q0 = lim) {
        /* a tile: up to Rmax pixels, cut at the range's end, (position-major) at the end of
         * a position, so its pixels share which taps fall in the padding, and (residue
         * order) at the end of the row's residue class; Rt of them computed */
        lim = q0 + Rmax < q_end ? q0 + Rmax : q_end;
        if (posmajor == 1 && lim > (q0 / B + 1) * B) lim = (q0 / B + 1) * B;
        memset(live, 0, sizeof live);
        int b, oh, ow;
        nh_pixel(&g, q0, &b, &oh, &ow);  /* then stepped in pixel order: no divisions */
#ifdef NH_HAS_TILE16
        if (wide16 && ow + NH_R16 <= g.Wo) {
            const float *t0 = nh_base(&g, x, b, oh, ow);
            if (t0 && q0 + NH_R16 <= q_end && nh_base(&g, x, b, oh, ow + NH_R16 - 1)) {
                const size_t o = (((size_t)b * g.Ho + oh) * g.Wo + ow) * (size_t)N;
                if (prefetch)
                    for (int r = 0; r < NH_R16; ++r) nh_prefetch_next_row(&g, x, b, oh, ow + r);
                nh_tile16_any(&g, t0, toffs, koff, w1, wk, blk_toff[fb], bb, y + o,
                              res ? res + o : NULL, relu);
                lim = q0 + NH_R16;
                continue;
            }
            /* a border pixel before a regular stretch: alone, so the stretch starts next */
            if (!t0 && q0 + 1 + NH_R16 <= q_end && ow + 1 + NH_R16 <= g.Wo
                && nh_base(&g, x, b, oh, ow + 1) && nh_base(&g, x, b, oh, ow + NH_R16))
                lim = q0 + 1;
        }
#endif
        if (posmajor == NH_ORDER_RESIDUE) {
            const long left = nh_residue_count(g.Wo, g.up, ow);
            if (lim > q0 + left) lim = q0 + left;
        }
        const int Rt = nh_tile_rows(V, lim - q0);
        if (lim > q0 + Rt) lim = q0 + Rt;  /* 5 or 6 pixels of an 8-pixel tile: 4, then 2 */
        if (posmajor == NH_ORDER_RESIDUE) {
            nh_residue_tile(&g, x, y, res, zero, n0, b, oh, ow, Rt, q0, lim, px, live, yo, ro);
            nh_tile_any(V, Rt, &g, px, live, w1, wk, blk_toff[fb], bb, yo, ro, relu, first);
            continue;
        }
        /* position-major: the tile is one position in consecutive images, so the first
         * pixel's rows, moved by whole images, are the others' */
        const int rows = posmajor ? 1 : Rt;
        const float *b0 = NULL;
        if (!posmajor && lim - q0 == Rt && ow + Rt <= g.Wo && (b0 = nh_base(&g, x, b, oh, ow))
            && nh_base(&g, x, b, oh, ow + Rt - 1)) {
            /* the common tile of a large plane: Rt pixels of one output row, every tap of
             * each inside the image, so every row is a fixed offset from the first pixel's
             * (0.94-1.00x the forward's time against the general set-up below, paired on
             * the second Intel host: docs/performance.md, fifteenth session) */
            const size_t o = (((size_t)b * g.Ho + oh) * g.Wo + ow) * (size_t)N + n0;
            const ptrdiff_t step = (ptrdiff_t)g.s * M;
            for (int r = 0; r < Rt; ++r) {
                yo[r] = g.pool ? nh_pooled(&g, y, b, oh, ow + r, n0, &first[r])
                               : y + o + (size_t)r * N;
                ro[r] = res ? res + o + (size_t)r * N : NULL;
                if (prefetch) nh_prefetch_next_row(&g, x, b, oh, ow + r);
            }
            for (int t = 0; t < KK; ++t) {
                const float *bt = b0 + toffs[t];
                live[t] = 1;
                for (int r = 0; r < Rt; ++r) px[t * Rt + r] = bt + r * step;
            }
        } else {
            for (int r = 0; r < rows; ++r) {
                /* tail: the tile's last pixel again, not stored */
                const size_t o = (((size_t)b * g.Ho + oh) * g.Wo + ow) * (size_t)N + n0;
                yo[r] = q0 + r >= lim ? NULL
                        : g.pool ? nh_pooled(&g, y, b, oh, ow, n0, &first[r]) : y + o;
                ro[r] = (res && yo[r]) ? res + o : NULL;
                const float *base = nh_base(&g, x, b, oh, ow);
                if (base) {  /* every tap inside the image: fixed offsets from one base */
                    for (int t = 0; t < KK; ++t) { px[t * Rt + r] = base + toffs[t]; live[t] = 1; }
                } else {
                    for (int t = 0; t < KK; ++t) {
                        const float *p = nh_tap(&g, x, b, oh, ow, t / kw, t % kw);
                        if (p) live[t] = 1;
                        px[t * Rt + r] = p ? p : zero;
                    }
                }
                if (prefetch && q0 + r < lim) nh_prefetch_next_row(&g, x, b, oh, ow);
                if (q0 + r + 1 < lim) nh_next(&g, &b, &oh, &ow);  /* else: the tail repeats it */
            }
            if (posmajor) {
                /* an image's input, output (pooled: its pooled output) and residual */
                const size_t xs = (size_t)H * W * M, rs = (size_t)g.Ho * g.Wo * N;
                const size_t ys = g.pool ? rs / 4 : rs;
                for (int r = 1; r < Rt; ++r) {
                    const int rr = q0 + r < lim ? r : (int)(lim - 1 - q0);  /* tail: the last again */
                    yo[r] = q0 + r < lim ? yo[0] + r * ys : NULL;
                    ro[r] = (res && yo[r]) ? ro[0] + r * rs : NULL;
                    first[r] = first[0];
                    for (int t = 0; t < KK; ++t)
                        px[t * Rt + r] = live[t] ? px[t * Rt] + rr * xs : zero;
                }
            }
        }
        nh_tile_any(V, Rt, &g, px, live, w1, wk, blk_toff[fb], bb, yo, ro, relu, first);
    }
#if defined(__AVX512F__)
    if (g.stream) _mm_sfence();  /* the run's non-temporal stores, ordered before it ends */
#endif
}

/* A forward call's work items (see hetconv_nhwc_forward) */
typedef struct {
    const nh_geom *g;
    const float *x, *zero, *w1p, *wkp, *bias, *res;
    float *y;
    const ptrdiff_t *toffs;
    const int *koff;
    const int *blk_n0, *blk_p0, *blk_v, *blk_toff;
    long npix, runs, per_run;
    int nfb, pixmajor, relu, prefetch;
} nh_fwd_job;

/* Work item it: filter block it / runs over run it % runs, or (pixel-major) that run for
 * every block, NH_PIXCHUNK pixels at a time */
static void nh_fwd_item(const nh_fwd_job *j, long it) {
    const long q_begin = (it % j->runs) * j->per_run;
    const long q_end = q_begin + j->per_run < j->npix ? q_begin + j->per_run : j->npix;
    if (!j->pixmajor) {
        nh_fwd_run(j->g, j->x, j->y, j->zero, j->toffs, j->koff, (int)(it / j->runs), q_begin,
                   q_end, j->blk_n0, j->blk_p0, j->blk_v, j->blk_toff, j->w1p, j->wkp, j->bias,
                   j->res, j->relu, j->prefetch);
        return;
    }
    for (long c0 = q_begin; c0 < q_end; c0 += NH_PIXCHUNK) {
        const long c1 = c0 + NH_PIXCHUNK < q_end ? c0 + NH_PIXCHUNK : q_end;
        for (int fb = 0; fb < j->nfb; ++fb)
            nh_fwd_run(j->g, j->x, j->y, j->zero, j->toffs, j->koff, fb, c0, c1, j->blk_n0,
                       j->blk_p0, j->blk_v, j->blk_toff, j->w1p, j->wkp, j->bias, j->res,
                       j->relu, j->prefetch && fb == 0);
    }
}

/*
 * y (B, Ho, Wo, N) = HetConv(x (B, H, W, M)), padding (ph, pw), stride s.
 * nfb filter blocks: blk_n0 (first filter), blk_p0 (first packed lane / 1: where the block's
 * weights start, in filters), blk_v (vectors, 1..4; vector v holds filters n0 + v * vs ..
 * n0 + v * vs + 15), blk_toff (offset of the block's class channels: 0 "shifted" with P | 16,
 * the first lane's class with 16 | P, class * Mk "blocked").  res (B, Ho, Wo, N) or NULL
 * is added before the ReLU (relu != 0).  pool = 2: a 2x2 max-pool of stride 2 follows (Ho and
 * Wo even, up = 1), y is the pooled (B, Ho/2, Wo/2, N).  Returns 0 or a negative code.
 */
int hetconv_nhwc_forward(const float *x, float *y, int B, int M, int N, int H, int W,
                         int kh, int kw, int s, int ph, int pw, int Mk, int ts, int lw,
                         int vs, int nfb, const int *blk_n0, const int *blk_p0,
                         const int *blk_v, const int *blk_toff, const float *w1p,
                         const float *wkp, const float *bias, const float *res, int relu,
                         int posmajor, int up, int Ho, int Wo, int pool, int nthreads) {
    nh_geom g = {B, M, N, H, W, (H + 2 * ph - kh) / s + 1, (W + 2 * pw - kw) / s + 1,
                 kh, kw, s, ph, pw, Mk, ts, lw, posmajor, up, vs};
    /* transposed strided (up > 1) in residue order only, and only that in residue order */
    if (up < 1 || posmajor < 0 || posmajor > NH_ORDER_RESIDUE
        || (up > 1) != (posmajor == NH_ORDER_RESIDUE))
        return -1;
    if (up > 1) {  /* transposed strided: the output size is the caller's (s must be 1) */
        if (s != 1) return -1;
        g.Ho = Ho; g.Wo = Wo;
    }
    if (nh_check(&g) || nh_check_blocks(&g, nfb, blk_n0, blk_p0, blk_v) || g.Ho < 1
        || g.Wo < 1 || g.Ho != Ho || g.Wo != Wo)
        return -1;
    if (pool != 0 && (pool != 2 || up != 1 || Ho % 2 || Wo % 2)) return -1;
    g.pool = pool;
    g.stream = !pool;  /* pooled: the windows' pixels read what the first one stored */
    const int T = kh * kw - 1, KK = kh * kw;
    const long npix = (long)B * g.Ho * g.Wo;
    g.wfar = npix <= NH_WFAR_MAX_PIXELS;
    float *zero = (float *)calloc((size_t)M + 64, sizeof(float));
    if (!zero) return -2;
    /* Work items: runs of pixel tiles, sized so there are NH_ITEMS_PER_THREAD items per thread,
     * taken one at a time by whichever thread is free (dynamic schedule; with fewer than
     * NH_DYNAMIC_MIN_PIXELS pixels 4 per thread, static: see below): on a shared host one
     * core often runs 10-20% slower than the other for a while, and a static split then waits
     * for its half.  Paired against 4 items per thread, static, on the third Intel host:
     * 0.87-1.05x per layer, VGG-16 P4 0.91-0.99x (docs/performance.md, twenty-second session);
     * every output is computed the same way whichever thread takes it.
     * Filter-block-major (an item is one block's run): a thread's consecutive items share the
     * block's weights in L2.  Pixel-major when all blocks' weights fit in L2 together
     * (NH_PIXMAJOR_MAX_WBYTES) and the runs are long (NH_PIXMAJOR_MIN_RUN): an item is a run
     * for every block, taken NH_PIXCHUNK pixels at a time for all blocks, so the input rows of
     * a chunk are read from memory once instead of once per block (stride 2 reads 4x the
     * input per output pixel): 1.03-1.14x on 128-256-channel layers at batch 16-64. */
    const int R = NH_RMAX;  /* the largest tile; runs are in units of it */
    const long ntiles = (npix + R - 1) / R;
    if (nthreads < 1) nthreads = 1;
    /* pixels per run: a multiple of both tile sizes (6 and 8), so only a run's last tile
     * can be partial, and pooled, of the pixels of a row of pooling windows (2 output rows),
     * so each window is one run's; position-major, 2 rows of positions of all B images (its
     * tiles end with each position anyway) */
    long unit = 24;
    if (pool && posmajor) unit = 2L * g.Wo * B;
    else if (pool) {
        const long span = 2L * g.Wo;
        long a = unit, b = span;  /* lcm(24, span) */
        while (b) { const long t = a % b; a = b; b = t; }
        unit = unit / a * span;
    }
    const long units = (npix + unit - 1) / unit;
    /* pooled runs of few units: one block per item, or one thread may get all the work */
    const int pixmajor = nfb > 1 && npix >= NH_PIXMAJOR_MIN_RUN * 4L * nthreads &&
        (size_t)N * ((size_t)M + (size_t)T * Mk) * sizeof(float) <= NH_PIXMAJOR_MAX_WBYTES &&
        units >= 2L * nthreads;
    const int groups = pixmajor ? 1 : nfb;  /* item groups: all blocks at once, or one each */
    /* few pixels (a small plane at batch 1): a fixed split, so each thread computes the same
     * filter blocks call after call and finds their weights in its L2 (512->512 7x7 b1: a
     * dynamic split of 8 runs per thread took 1.06-1.10x the time of 4 static ones, paired;
     * a whole VGG-16 at batch 1: 1.00-1.01x, its layers evict each other's weights anyway) */
    const int dynamic = npix >= NH_DYNAMIC_MIN_PIXELS;
    long runs = ((long)(dynamic ? NH_ITEMS_PER_THREAD : 4) * nthreads + groups - 1) / groups;
    if (runs > ntiles) runs = ntiles;
    if (runs > units) runs = units;
    if (runs < 1) runs = 1;
    const long per_run = (units + runs - 1) / runs * unit;
    const long items = (long)groups * runs;
    /* inputs larger than L2 (image-major order): prefetch the next output row's new input */
    const int prefetch = posmajor == 0 && up == 1 &&
        (size_t)B * H * W * M * sizeof(float) > NH_PREFETCH_MIN_BYTES;
    ptrdiff_t toffs[NH_KKMAX];  /* offset of each tap from the top-left tap, inside the image */
    for (int t = 0; t < KK; ++t) toffs[t] = nh_toff(&g, t);
    /* 16 -> 16 layers (nh_tile16): the taps' steps in one list, step k = e * Mk + j of tap e
     * reading toffs[t] + j * ts from the pixel's top-left row */
    int *koff = NULL;
    if (M == 16 && N == 16) {
        koff = (int *)malloc(sizeof(int) * ((size_t)T * Mk + 1));
        if (!koff) { free(zero); return -2; }
        const int centre = (g.kh / 2) * kw + kw / 2;
        for (int e = 0; e < T; ++e) {
            const int t = e < centre ? e : e + 1;
            for (int j = 0; j < Mk; ++j)
                koff[(size_t)e * Mk + j] = (int)(toffs[t] + (ptrdiff_t)j * ts);
        }
    }
    const nh_fwd_job job = {&g, x, zero, w1p, wkp, bias, res, y, toffs, koff, blk_n0, blk_p0, blk_v,
                            blk_toff, npix, runs, per_run, nfb, pixmajor, relu, prefetch};
    if (dynamic) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (items > 1)
        for (long it = 0; it < items; ++it) nh_fwd_item(&job, it);
    } else {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (items > 1)
        for (long it = 0; it < items; ++it) nh_fwd_item(&job, it);
    }
    free(zero);
    free(koff);
    return 0;
}

/*
 * Weight gradient.  Non-centre taps: sum[block, e, j, lane] = sum over pixels of
 * gy[pixel, n0 + lane] * x[pixel + tap_e, toff + j * ts + lane % lw], in the layout of wkp;
 * centre taps: sum[n0 + lane, c] = sum over pixels of gy[pixel, n0 + lane] *
 * x[centre pixel, c] (the same tile with lw = ts = 1 over all M, summed in w1p's layout).
 * nh_wtile: J steps x V vectors in J*V accumulators over n pixels, added into out.  Pixel i
 * reads the input at xr[i] + xoff and the output gradient at gr[i] + goff (the lists are the
 * chunk's, shared by its filter blocks: xoff and goff are the block's).  pf > 0: the input
 * the pixel pf places ahead reads is prefetched into L1 (see NH_WPREFETCH_S2).
 */
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void nh_wtile(
        const int J, const int V, const int lw, int n, const float *const *xr,
        const float *const *gr, int ts, int vs, int j0, int Mk, float *out, ptrdiff_t xoff,
        int goff, int pf) {
    const int VW = 16 * V;
    __m512 acc[NH_JRMAX][4];
    _Pragma("GCC unroll 8") for (int a = 0; a < J; ++a)
        _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) acc[a][v] = _mm512_setzero_ps();
    ptrdiff_t off[NH_JRMAX];
    _Pragma("GCC unroll 8") for (int a = 0; a < J; ++a)
        off[a] = xoff + (ptrdiff_t)(j0 + a < Mk ? j0 + a : Mk - 1) * ts;
    /* unrolled by 4 pixels: their loads issue ahead of the previous pixel's multiply-adds.
     * Paired on the second Intel host: 0.92-0.97x the weight gradient's time (by 2: 0.95-0.98x,
     * by 8: 1.00-1.03x against 4; docs/performance.md, sixteenth session) */
    _Pragma("GCC unroll 4") for (int i = 0; i < n; ++i) {
        const float *xp = xr[i], *gp = gr[i] + goff;
        if (pf) {  /* both ends of the J floats (they may straddle two cache lines) */
            const float *xa = xr[i + pf < n ? i + pf : n - 1];
            _mm_prefetch((const char *)(xa + off[0]), _MM_HINT_T0);
            _mm_prefetch((const char *)(xa + off[J - 1]), _MM_HINT_T0);
        }
        __m512 gv[4];
        _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) gv[v] = _mm512_loadu_ps(gp + vs * v);
        _Pragma("GCC unroll 8") for (int a = 0; a < J; ++a) {
            const __m512 xv = nh_load(xp + off[a], lw);
            _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) acc[a][v] = _mm512_fmadd_ps(xv, gv[v], acc[a][v]);
        }
    }
    for (int a = 0; a < J && j0 + a < Mk; ++a)
        _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v) {
            float *o = out + (size_t)(j0 + a) * VW + 16 * v;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[a][v]));
        }
}

/* nh_wtile with jt steps (the full tile FULL, or the last tiles' 4 and 2) and V vectors */
#define NH_WTILE_J(FULL, V, LW)                                                     \
    do {                                                                            \
        if (jt == 2) nh_wtile(2, V, LW, n, xr, gr, ts, vs, j0, Mk, out, xoff, goff, pf);       \
        else if (jt == 4) nh_wtile(4, V, LW, n, xr, gr, ts, vs, j0, Mk, out, xoff, goff, pf);  \
        else nh_wtile(FULL, V, LW, n, xr, gr, ts, vs, j0, Mk, out, xoff, goff, pf);            \
    } while (0)
#define NH_WTILE_CASES(LW)                                                         \
    switch (V) {                                                                   \
        case 4: NH_WTILE_J(NH_JR4, 4, LW); break;                                  \
        case 3: NH_WTILE_J(NH_JRMAX, 3, LW); break;                                \
        case 2: NH_WTILE_J(NH_JRMAX, 2, LW); break;                                \
        default: NH_WTILE_J(NH_JRMAX, 1, LW); break;                               \
    }

static void nh_wtile_any(int V, int jt, int lw, int n, const float *const *xr,
                         const float *const *gr, int ts, int vs, int j0, int Mk, float *out,
                         ptrdiff_t xoff, int goff, int pf) {
    switch (lw) {
        case 1: NH_WTILE_CASES(1) break;
        case 2: NH_WTILE_CASES(2) break;
        case 4: NH_WTILE_CASES(4) break;
        case 8: NH_WTILE_CASES(8) break;
        default: NH_WTILE_CASES(16) break;
    }
}

/* The weight gradient of a 16 -> 16 "shifted" 3x3 layer at stride 1 (P = 16 / MK), for
 * pixels whose taps are all inside the image: taps E0 .. E0 + NE - 1 (of the 8 around the
 * centre) and, with CEN, the centre's 16 channels in one pass of NE x MK (+ 16)
 * accumulators, each pixel's output-gradient vector loaded once for all of them (nh_wtile:
 * once per tap, in passes of 4 accumulators at P = 4).  xr[i]: the pixel's top-left tap row;
 * an input row is rowf floats; out: the block's sums (taps (8, MK, 16), then the centre). */
static inline __attribute__((always_inline)) void nh_wtile16(
        const int MK, const int E0, const int NE, const int CEN, int n, const float *const *xr,
        const float *const *gr, ptrdiff_t rowf, ptrdiff_t xoff, int goff, float *out) {
    const int LW = 16 / MK, NA = NE * MK + 16 * CEN;
    __m512 acc[24];
    _Pragma("GCC unroll 32") for (int a = 0; a < NA; ++a) acc[a] = _mm512_setzero_ps();
    _Pragma("GCC unroll 2") for (int i = 0; i < n; ++i) {
        const float *xp = xr[i];
        const __m512 gv = _mm512_loadu_ps(gr[i] + goff);
        _Pragma("GCC unroll 8") for (int a = 0; a < NE; ++a) {
            const int e = E0 + a, t = e < 4 ? e : e + 1;
            const float *q = xp + xoff + (t / 3) * rowf + (t % 3) * 16;
            _Pragma("GCC unroll 8") for (int j = 0; j < MK; ++j)
                acc[a * MK + j] = _mm512_fmadd_ps(nh_load(q + j * LW, LW), gv, acc[a * MK + j]);
        }
        if (CEN) {
            const float *q = xp + rowf + 16;
            _Pragma("GCC unroll 16") for (int c = 0; c < 16; ++c)
                acc[NE * MK + c] = _mm512_fmadd_ps(_mm512_set1_ps(q[c]), gv, acc[NE * MK + c]);
        }
    }
    _Pragma("GCC unroll 32") for (int a = 0; a < NE * MK; ++a) {
        float *o = out + (size_t)(E0 * MK + a) * 16;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[a]));
    }
    if (CEN)
        _Pragma("GCC unroll 16") for (int c = 0; c < 16; ++c) {
            float *o = out + (size_t)(8 * MK + c) * 16;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[NE * MK + c]));
        }
}

/* The 8 taps and the centre of the interior pixels by nh_wtile16, in passes of at most 24
 * accumulators */
static void nh_wtile16_all(int Mk, int n, const float *const *xr, const float *const *gr,
                           ptrdiff_t rowf, ptrdiff_t xoff, int goff, float *out) {
    switch (Mk) {
        case 8:
            nh_wtile16(8, 0, 3, 0, n, xr, gr, rowf, xoff, goff, out);
            nh_wtile16(8, 3, 3, 0, n, xr, gr, rowf, xoff, goff, out);
            nh_wtile16(8, 6, 1, 1, n, xr, gr, rowf, xoff, goff, out);
            nh_wtile16(8, 7, 1, 0, n, xr, gr, rowf, xoff, goff, out);
            break;
        case 4:
            nh_wtile16(4, 0, 6, 0, n, xr, gr, rowf, xoff, goff, out);
            nh_wtile16(4, 6, 2, 1, n, xr, gr, rowf, xoff, goff, out);
            break;
        case 2:
            nh_wtile16(2, 0, 4, 1, n, xr, gr, rowf, xoff, goff, out);
            nh_wtile16(2, 4, 4, 0, n, xr, gr, rowf, xoff, goff, out);
            break;
        default: nh_wtile16(1, 0, 8, 1, n, xr, gr, rowf, xoff, goff, out); break;
    }
}
#else
static void nh_wtile_any(int V, int jt, int lw, int n, const float *const *xr,
                         const float *const *gr, int ts, int vs, int j0, int Mk, float *out,
                         ptrdiff_t xoff, int goff, int pf) {
    const int VW = 16 * V;
    (void)pf;
    for (int a = 0; a < jt && j0 + a < Mk; ++a)
        for (int l = 0; l < VW; ++l) {
            float s = 0.f;
            const int f = l / 16 * vs + l % 16;  /* lane l's filter, from the block's first */
            for (int i = 0; i < n; ++i) s += xr[i][xoff + (j0 + a) * ts + l % lw] * gr[i][goff + f];
            out[(size_t)(j0 + a) * VW + l] += s;
        }
}
#endif

#define NH_WCHUNK 256     /* pixels per pass at stride 1 (see nh_wchunk) */
#define NH_WCHUNK_S2 64   /* ... and at stride 2 */
/* Stride > 1: each pixel's input rows are s columns apart (4 KB at 512 channels), so the
 * hardware prefetchers, which stay inside a 4 KB page, do not follow a tile's reads; the tile
 * prefetches the input of the pixel this many places ahead in its list.  Paired on the Zen 4
 * host: 0.90-0.99x the stride-2 weight gradient's time at batch 16 (128-512 channels),
 * 0.98-1.02x at batch 1 (4 ahead: no gain; 16: about the same as 8).  Not at stride 1,
 * where the rows are adjacent: 0.98-1.01x (docs/performance.md, seventeenth session) */
#define NH_WPREFETCH_S2 8
#define NH_WRANGE 2048    /* pixels per range at most (fixed, not per thread: see nranges) */
#define NH_WPART_MAX (1L << 24)  /* floats of partial sums at most (64 MB) */

/*
 * Work items: (filter block, range of pixels).  An item walks its range in chunks of 256
 * pixels (64 at stride 2: nh_wchunk) and, per chunk, every tap (and the centre), so the
 * chunk's gy rows and the input rows around it stay in L2 while all of the block's
 * weights are summed (a loop over taps outside the pixels streamed the whole activations
 * once per tap).  With several
 * ranges each item sums into its own partial buffer and the partials are added in range
 * order at the end, so the result does not depend on the thread count (the ranges depend
 * only on the layer); with one range (small layers) the items sum into one buffer.
 * The sums (taps in the layout of wkp, centres in w1p's block layout) are then written
 * straight into the parameters' gradients through two index maps (one pass, no
 * intermediate (N, M) matrix or packed copy for the caller to scatter and gather):
 *   tap_dst[i]: where packed tap weight i goes in gk (weight_k's gradient, its own strides);
 *   centre_dst[n * M + c]: where filter n's centre weight on channel c goes: gk[d] for
 *     d >= 0 (a channel of its class: a KxK kernel's centre), else g1[-1 - d] (weight_1).
 */
static void nh_map_centre(const float *src, float *gk, float *g1, const int *centre_dst,
                          int M, int n0, int VW, int vs) {
    for (int c0 = 0; c0 < M; c0 += 16) {  /* 16 channels x VW filters at a time */
        const int c1 = c0 + 16 < M ? c0 + 16 : M;
        for (int l = 0; l < VW; ++l) {
            const int *dst = centre_dst + (size_t)(n0 + l / 16 * vs + l % 16) * M;  /* lane l's filter */
            for (int c = c0; c < c1; ++c) {
                const float v = src[(size_t)c * VW + l];
                const int d = dst[c];
                if (d >= 0) gk[d] = v;
                else g1[-1 - (long)d] = v;
            }
        }
    }
}

/* Pixels per pass of the weight gradient.  Every (tap, step tile) pass over a chunk ends by
 * adding its accumulators into the sums, so longer chunks pay that less often: 256 pixels
 * instead of 64 took 0.90-0.95x the time on ten stride-1 layers of 32-512 channels, batch 1
 * to 128 (paired A/B in one process, fourteenth session).  At stride 2 a chunk reads 4x the
 * input rows, and longer chunks were mixed (0.92x at 512 channels 14x14, 1.04-1.09x at 128
 * and 256 channels 56x56 and 28x28): those keep 64. */
static inline int nh_wchunk(const nh_geom *g) { return g->s == 1 ? NH_WCHUNK : NH_WCHUNK_S2; }

/* Weight-gradient sums of filter blocks [fb_lo, fb_hi) over output pixels [c0, c1) (at most
 * NH_WCHUNK): every tap then the centre, added into each block's sums in `sums` (taps (T, Mk,
 * VW), then the centre (M, VW), at blk_p0 * per_filter).  Once per chunk: each pixel's offset
 * of its top-left tap (which may lie in the padding) and a mask of its taps inside the image;
 * once per tap, for all blocks: the list of the pixels whose tap is inside (input row, output
 * gradient row), a branch-free pass over the masks.  Built per tap and block with a lookup
 * per border pixel, the lists took 3-11% of the weight gradient; shared and built this way,
 * paired in one process on the second Intel host: 0.93-1.00x the time (0.93x at 128 channels
 * 16x16 batch 64, whose two blocks share a chunk; docs/performance.md, sixteenth session). */
static void nh_wgrad_chunk(const nh_geom *g, const float *x, const float *gy, int fb_lo,
                           int fb_hi, long c0, long c1, const int *blk_n0, const int *blk_p0,
                           const int *blk_v, const int *blk_toff, float *sums, long per_filter,
                           const float **xr, const float **gr) {
    const int kh = g->kh, kw = g->kw, M = g->M, Mk = g->Mk, N = g->N, lw = g->lw, ts = g->ts;
    const int vs = g->vs, nq = (int)(c1 - c0);
    const int T = kh * kw - 1, centre = (kh / 2) * kw + kw / 2;
    const int pf = g->s > 1 ? NH_WPREFETCH_S2 : 0;  /* input prefetch distance (see there) */
    ptrdiff_t o[NH_WCHUNK];   /* top-left tap's offset in x (row ih0, column iw0) */
    uint64_t live[NH_WCHUNK]; /* bit t: tap t inside the image (kh * kw <= NH_KKMAX < 64) */
    int pix[NH_WCHUNK];       /* the pixel (from c0) of entry i of o and live */
    int b, oh, ow;
    nh_pixel(g, c0, &b, &oh, &ow);  /* then stepped: no division per pixel */
#ifdef NH_HAS_TILE16
    /* 16 -> 16 "shifted" 3x3 at stride 1, P = 2 .. 16 (one block of 16 filters): the
     * interior pixels by nh_wtile16 (a pixel's taps and centre in one to four passes), the
     * per-tap lists below keep the border pixels (P = 1, Mk = 16: all pixels) */
    const int narrow = M == 16 && N == 16 && kh == 3 && kw == 3 && g->s == 1 && g->up == 1
        && fb_hi == fb_lo + 1 && blk_v[fb_lo] == 1 && lw == ts && lw * Mk == 16 && Mk <= 8;
#endif
    for (int i = 0; i < nq; ++i) {
        const int ih0 = oh * g->s - g->ph, iw0 = ow * g->s - g->pw;
        uint64_t cols = 0, m = 0;
        for (int v = 0; v < kw; ++v) cols |= (uint64_t)(iw0 + v >= 0 && iw0 + v < g->W) << v;
        for (int u = 0; u < kh; ++u)
            if (ih0 + u >= 0 && ih0 + u < g->H) m |= cols << (u * kw);
        o[i] = (((ptrdiff_t)b * g->H + ih0) * g->W + iw0) * (ptrdiff_t)M;
        live[i] = m;
        pix[i] = i;
        nh_next(g, &b, &oh, &ow);
    }
    int nl = nq;  /* entries in o, live and pix */
#ifdef NH_HAS_TILE16
    if (narrow) {  /* the interior pixels here, the others (kept in o, live, pix) below */
        int n = 0;
        nl = 0;
        for (int i = 0; i < nq; ++i) {  /* written always, kept (advanced) where interior */
            const int in = live[i] == 0x1FF;
            xr[n] = x + (in ? o[i] : 0);  /* (a border pixel's offset may point before x) */
            gr[n] = gy + (size_t)(c0 + i) * N;
            n += in;
            o[nl] = o[i];
            live[nl] = live[i];
            pix[nl] = i;
            nl += !in;
        }
        if (n)
            nh_wtile16_all(Mk, n, xr, gr, (ptrdiff_t)g->W * 16, blk_toff[fb_lo], blk_n0[fb_lo],
                           sums + (size_t)blk_p0[fb_lo] * per_filter);
    }
#endif
    for (int e = -1; e < T; ++e) {  /* e = -1: the centre */
        const int t = e < 0 ? centre : (e < centre ? e : e + 1);
        const ptrdiff_t toff = nh_toff(g, t);
        int n = 0;
        for (int i = 0; i < nl; ++i) {  /* written always, kept (n advanced) if inside */
            const int in = (int)(live[i] >> t & 1);
            xr[n] = x + (in ? o[i] + toff : 0);
            gr[n] = gy + (size_t)(c0 + pix[i]) * N;
            n += in;
        }
        if (!n) continue;
        for (int fb = fb_lo; fb < fb_hi; ++fb) {
            const int V = blk_v[fb], n0 = blk_n0[fb], VW = 16 * V;
            float *out_t = sums + (size_t)blk_p0[fb] * per_filter;
            if (e < 0) {
                float *out_c = out_t + (size_t)T * Mk * VW;
                for (int j0 = 0, jt; j0 < M; j0 += jt)
                    nh_wtile_any(V, jt = nh_wsteps(V, M - j0), 1, n, xr, gr, 1, vs, j0, M,
                                 out_c, 0, n0, pf);
            } else {
                float *ot = out_t + (size_t)e * Mk * VW;
                for (int j0 = 0, jt; j0 < Mk; j0 += jt)
                    nh_wtile_any(V, jt = nh_wsteps(V, Mk - j0), lw, n, xr, gr, ts, vs, j0, Mk,
                                 ot, blk_toff[fb], n0, pf);
            }
        }
    }
}

int hetconv_nhwc_wgrad(const float *x, const float *gy, float *gk, float *g1,
                       const int *tap_dst, const int *centre_dst, int B, int M,
                       int N, int H, int W, int kh, int kw, int s, int ph, int pw, int Mk,
                       int ts, int lw, int vs, int nfb, const int *blk_n0, const int *blk_p0,
                       const int *blk_v, const int *blk_toff, int nthreads) {
    nh_geom g = {B, M, N, H, W, (H + 2 * ph - kh) / s + 1, (W + 2 * pw - kw) / s + 1,
                 kh, kw, s, ph, pw, Mk, ts, lw, 0, 1, vs};
    /* g1 (weight_1's gradient) may be NULL only without a 1x1 part (P = 1: Mk = M) */
    if (nh_check(&g) || nh_check_blocks(&g, nfb, blk_n0, blk_p0, blk_v) || g.Ho < 1
        || g.Wo < 1 || !gk || (!g1 && Mk < M) || (!tap_dst && kh * kw > 1) || !centre_dst)
        return -1;
    const int T = kh * kw - 1;
    const long npix = (long)B * g.Ho * g.Wo;
    const long per_filter = (long)T * Mk + M;  /* sums per filter: taps, then the centre */
    const long whole = (long)N * per_filter;
    long nranges = (npix + NH_WRANGE - 1) / NH_WRANGE;
    /* more than 4 ranges: a multiple of 4, so the pixel-major split below (at least 4 ranges
     * per thread) divides evenly over 1, 2 and 4 threads.  ResNet-50's 128-channel layers at
     * batch 16 had 7 ranges (12544 pixels): too few for that split on 2 threads, and 4 + 3
     * items had they been allowed.  The ranges fix the order of the sums, so they do not
     * depend on the thread count.  Paired on the Zen 4 host: 0.84-0.91x the weight
     * gradient's time on 128->128 56x56 stride 2 b16 (P4, P8), 0.93-0.99x on 128->128 28x28
     * b16, 0.98x on 64->64 56x56 b16 (25 -> 28 ranges; docs/performance.md, seventeenth
     * session) */
    if (nranges > 4) nranges = (nranges + 3) / 4 * 4;
    if (nranges * whole > NH_WPART_MAX) nranges = NH_WPART_MAX / whole;
    if (nranges < 1) nranges = 1;  /* also with no pixels (B = 0): the gradient is zero */
    const long per_range = (npix + nranges - 1) / nranges;
    if (nthreads < 1) nthreads = 1;
    /* Work items: (filter block, pixel range), or - when all blocks' sums fit in L2 and there
     * are enough ranges - a pixel range for every block, chunk by chunk, so the chunk's input
     * rows are read from memory once instead of once per block (as in the forward; 1.07x on
     * 128->128 16x16 b64, no change elsewhere) and its pixel lists are built once for all
     * blocks (see nh_wgrad_chunk).  A block's sums of one range add the chunks
     * in the same order either way. */
    const int pixmajor = nfb > 1 && nranges >= 4L * nthreads &&
        (size_t)whole * sizeof(float) <= NH_PIXMAJOR_MAX_WBYTES;
    const long items = pixmajor ? nranges : (long)nfb * nranges;
    const int chunk = nh_wchunk(&g);
    /* each range's sums (one range: the sums themselves); each item zeroes its own */
    float *part = (float *)malloc(sizeof(float) * (size_t)(nranges * whole));
    if (!part) return -2;
    int status = 0;
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        const float **xr = (const float **)malloc(sizeof(float *) * NH_WCHUNK);
        const float **gr = (const float **)malloc(sizeof(float *) * NH_WCHUNK);
        if (!xr || !gr) {
#pragma omp atomic write
            status = -2;
        }
        /* dynamic: each item sums into its own range's slots, so the sums do not depend on
         * which thread took it */
#pragma omp for schedule(dynamic, 1)
        for (long it = 0; it < items; ++it) {
            if (!xr || !gr) continue;
            const long r = it % nranges;
            const int fb_lo = pixmajor ? 0 : (int)(it / nranges), fb_hi = pixmajor ? nfb : fb_lo + 1;
            const long r1 = (r + 1) * per_range < npix ? (r + 1) * per_range : npix;
            for (int fb = fb_lo; fb < fb_hi; ++fb)  /* the item's sums, zeroed by its thread */
                memset(part + r * whole + (size_t)blk_p0[fb] * per_filter, 0,
                       sizeof(float) * (size_t)per_filter * 16 * blk_v[fb]);
            for (long c0 = r * per_range; c0 < r1; c0 += chunk) {
                const long c1 = c0 + chunk < r1 ? c0 + chunk : r1;
                nh_wgrad_chunk(&g, x, gy, fb_lo, fb_hi, c0, c1, blk_n0, blk_p0, blk_v,
                               blk_toff, part + r * whole, per_filter, xr, gr);
            }
        }
        free(xr); free(gr);
        /* the partials, added in range order (range 0's slots then hold the sums) */
#pragma omp for schedule(static)
        for (long i = 0; i < (nranges > 1 ? whole : 0); ++i) {
            float acc = 0.f;
            for (long r = 0; r < nranges; ++r) acc += part[r * whole + i];
            part[i] = acc;
        }
        /* into place: the taps and the centres to gk and g1, through the maps */
#pragma omp for schedule(static)
        for (int fb = 0; fb < nfb; ++fb) {
            if (status) continue;
            const int n0 = blk_n0[fb], p0 = blk_p0[fb], VW = 16 * blk_v[fb];
            const float *src = part + (size_t)p0 * per_filter;
            if (T > 0) {  /* (a 1x1 layer has no other taps, and no tap map: NULL) */
                const int *td = tap_dst + (size_t)p0 * T * Mk;
                for (long i = 0; i < (long)T * Mk * VW; ++i) gk[td[i]] = src[i];
            }
            nh_map_centre(src + (size_t)T * Mk * VW, gk, g1, centre_dst, M, n0, VW, g.vs);
        }
    }
    free(part);
    return status;
}

/*
 * Weight packing helper: dst[i] = src[idx[i]] for i < n, idx 32-bit (the layouts' index
 * tables), OpenMP over i.  The packings of the channels-last kernel are one gather each,
 * per training step and layer, so they should run at memory speed (torch.take with 64-bit
 * indices: about 3x slower).  (The weight gradient writes through its maps itself.)
 */
void hetconv_gather(const float *src, const int *idx, float *dst, long n, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > 65536)
    for (long i = 0; i < n; ++i) dst[i] = src[idx[i]];
}

/* dst[i] = src_k[idx[i]] where idx[i] >= 0, else src_1[-1 - idx[i]]: the packed centre
 * weights, each from weight_k (a KxK kernel's centre) or weight_1, in one pass. */
void hetconv_gather2(const float *src_k, const float *src_1, const int *idx, float *dst,
                     long n, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > 65536)
    for (long i = 0; i < n; ++i) dst[i] = idx[i] >= 0 ? src_k[idx[i]] : src_1[-1 - (long)idx[i]];
}

/* hetconv_nhwc_forward with every argument but the tensors and the thread count in one
 * struct (see hetconv_native_forward_packed). */
typedef struct {
    int B, M, N, H, W, kh, kw, s, ph, pw, Mk, ts, lw, vs, nfb;
    const int *blk_n0, *blk_p0, *blk_v, *blk_toff;
    const float *w1p, *wkp, *bias;
    int relu, posmajor, up, Ho, Wo, pool;
} hetconv_nhwc_args;

int hetconv_nhwc_forward_packed(const hetconv_nhwc_args *a, const float *x, float *y,
                                const float *res, int nthreads) {
    return hetconv_nhwc_forward(x, y, a->B, a->M, a->N, a->H, a->W, a->kh, a->kw, a->s, a->ph,
                                a->pw, a->Mk, a->ts, a->lw, a->vs, a->nfb, a->blk_n0,
                                a->blk_p0, a->blk_v, a->blk_toff, a->w1p, a->wkp, a->bias, res,
                                a->relu, a->posmajor, a->up, a->Ho, a->Wo, a->pool, nthreads);
}

/* A sequence of count channels-last forwards, each reading the one before (no residual):
 * layer 0 reads x, the last writes y, the ones between write buf[i % 2] (each buffer holds
 * the largest of those outputs), so one call runs a VGG's feature extractor.  Returns 0, -1
 * where a layer's input is not the previous output (the shapes disagree), or the first
 * layer's nonzero code. */
int hetconv_nhwc_sequence(const hetconv_nhwc_args *const *args, int count, const float *x,
                          float *buf0, float *buf1, float *y, int nthreads) {
    if (count < 1) return -1;
    for (int i = 1; i < count; ++i) {
        const hetconv_nhwc_args *p = args[i - 1], *a = args[i];
        const int sh = p->pool ? 2 : 1;
        if (a->up != 1 || p->up != 1 || a->B != p->B || a->M != p->N || a->H != p->Ho / sh
                || a->W != p->Wo / sh)
            return -1;
    }
    const float *in = x;
    for (int i = 0; i < count; ++i) {
        float *out = i == count - 1 ? y : (i % 2 ? buf1 : buf0);
        int rc = hetconv_nhwc_forward_packed(args[i], in, out, NULL, nthreads);
        if (rc != 0) return rc;
        in = out;
    }
    return 0;
}
