/*
 * hetconv native CPU kernel: the HetConv forward pass as one direct convolution
 * with exactly the paper's multiply-adds (FL_HC), for NCHW float32 input,
 * stride 1, dilation 1 and "same" padding (odd Kh, Kw).
 *
 * Formulation.  Every filter reads every input channel at the centre tap (its
 * 1x1 kernels and the centre of its KxK kernels), so the centre taps form one
 * dense (N x M) pointwise matrix with no zero in it.  The remaining Kh*Kw - 1
 * taps touch only the M/P input channels of the filter's class.  Per output
 * pixel that is M + (Kh*Kw - 1) * M/P multiply-adds per filter: FL_HC exactly.
 *
 * Vectorisation is over output pixels (16 consecutive pixels of the flattened
 * H*W plane per AVX-512 register), never over channels, so narrow groups (M/P
 * = 1..16) waste no lanes.  A micro-kernel computes 4 filters (of one class
 * where it can) x up to 96 pixels in up to 24 accumulators: each vector loaded
 * feeds 4 FMAs.  Taps that leave the image read the zero borders of a padded
 * copy of the image (see "Geometry" below), so the inner loop has no masks;
 * at stride 1, where the padded geometry would compute 10% more positions (4x4
 * and 8x8 planes), the input is read in place with the border lanes masked off
 * instead (see "Stride 1 without a copy").
 * Output planes are written at arbitrary indices and
 * input planes read through an index list, so the "shifted" pattern costs no
 * permutation at all.
 *
 * The Python side (hetconv/native.py) packs the weights:
 *   w1p   (nblk, M, 4)        centre-tap matrix, per block of 4 filters
 *   wkp   (nblk, Mk, T, 4)    the T = Kh*Kw - 1 other taps of each KxK kernel
 *   bp    (nblk, 4)           bias (or NULL)
 *   blk_class (nblk)          the class of each block's filters
 *   blk_out   (nblk, 4)       output plane of each filter slot (-1: unused)
 *   chan  (P, Mk)             the input channels of each class
 *   tap_dh, tap_dw (T)        offsets of the non-centre taps
 * Built without AVX-512 the same loops run in scalar C (correct, not fast);
 * hetconv_native_isa() tells which.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define NB 4   /* filters per micro-kernel block */
#define NCMAX 6  /* 16-position chunks per micro-kernel block, at most */
#define VL 16  /* pixels per chunk */
#define LAYOUT_X_PADDED 1    /* forward layouts (see "Padded layouts") */
#define LAYOUT_Y_PADDED 2
#define LAYOUT_RES_PADDED 4
#define LAYOUT_ALL 7

int hetconv_native_isa(void) {
#if defined(__AVX512F__)
    return 512;
#else
    return 0;
#endif
}

int hetconv_native_version(void) { return 5; }

/*
 * The machine's multiply-add rate, for benchmark reports (the caller times the call):
 * on each of nthreads threads, iters steps of FMA_CHAINS independent chains of 16 floats,
 * a = a * b + c from a = 0; 2 * 16 * FMA_CHAINS * iters flops per thread.  Independent
 * chains keep both FMA units busy whatever their latency; b and c arrive at run time so
 * the compiler cannot fold the loop.  Returns the sum of every chain's last value over all
 * threads (b = c = 1: 16 * FMA_CHAINS * iters * nthreads exactly, below 2^24 per value).
 */
#define FMA_CHAINS 24
double hetconv_fma_loop(long iters, int nthreads, float b, float c) {
    double total = 0.0;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        float out[16 * FMA_CHAINS];
#if defined(__AVX512F__)
        __m512 a[FMA_CHAINS];
        const __m512 vb = _mm512_set1_ps(b), vc = _mm512_set1_ps(c);
        for (int i = 0; i < FMA_CHAINS; ++i) a[i] = _mm512_setzero_ps();
        for (long k = 0; k < iters; ++k) {
            _Pragma("GCC unroll 24") for (int i = 0; i < FMA_CHAINS; ++i)
                a[i] = _mm512_fmadd_ps(a[i], vb, vc);
        }
        for (int i = 0; i < FMA_CHAINS; ++i) _mm512_storeu_ps(out + 16 * i, a[i]);
#else
        for (int i = 0; i < 16 * FMA_CHAINS; ++i) out[i] = 0.f;
        for (long k = 0; k < iters; ++k)
            for (int i = 0; i < 16 * FMA_CHAINS; ++i) out[i] = out[i] * b + c;
#endif
        for (int i = 0; i < 16 * FMA_CHAINS; ++i) total += out[i];
    }
    return total;
}

/*
 * Geometry.  Each image is copied (by the thread that computes it, into a
 * buffer that stays in L2) into zero-padded planes, and outputs are computed
 * at every position of a regular grid of rows, some of whose columns are
 * thrown away, so every tap is a plain unaligned load at a fixed offset: no
 * masks in the inner loop.  Each 16-position chunk is written out with a
 * compress (its valid lanes are consecutive output pixels) and one masked
 * store.
 *
 * Stride 1: per channel one plane of ph zero rows, the H rows of Wp = W + pw
 *   floats (the pw zero columns after each row are also the left border of the
 *   next row) and ph zero rows; computed positions are the H rows (pw / (W + pw)
 *   of them thrown away).  Tap (u, v) is at offset (u - ph) * Wp + (v - pw).
 * Stride 2: per channel four phase planes, phase (a, b) holding the padded
 *   input's rows 2i + a and columns 2j + b, of Hq = Ho + (Kh - 1) / 2 rows of
 *   Wp = Wo + (Kw - 1) / 2 floats; computed positions are the Ho rows of the
 *   phase grid (columns >= Wo thrown away), and tap (u, v) is phase
 *   (u % 2, v % 2) at offset (u / 2) * Wp + v / 2: a strided convolution
 *   becomes four contiguous ones.
 */
typedef struct {
    int H, W, Ho, Wo, s, ph, pw, Wp, PS;  /* PS: storage per channel */
    int QS, Hq;                 /* stride 2: phase plane size and rows */
    int nchunk;                 /* chunks of computed positions */
    int npb, *pb_start, *pb_len;/* pixel blocks: runs of at most NCMAX chunks */
    int first;                  /* first computed position within a channel's storage */
    int lead, slack;            /* buffer margins before the first and after the last channel */
    uint16_t *smask;            /* per chunk: lanes that are real output pixels */
    int *sidx;                  /* per chunk: output index of the first such lane */
    /* Stride 1, read in place (see "Stride 1 without a copy"): chunks of the H*W plane,
     * pixel blocks over them, and per kernel tap (u, v) and chunk the lanes whose tap
     * lies inside the image (row u * kw + v; the centre row masks only the plane's end). */
    int dchunk, dnpb, *dpb_start, *dpb_len, dcentre;
    uint16_t *dmask;
    int refs;                   /* references: the cache's and those of prepared passes */
} geom_t;

/* Split n chunks into runs of at most NCMAX, balanced: npb runs, start[i], len[i]. */
static int balanced_runs(int n, int **start, int **len) {
    const int npb = (n + NCMAX - 1) / NCMAX;
    *start = (int *)calloc((size_t)(npb > 0 ? npb : 1), sizeof(int));
    *len = (int *)calloc((size_t)(npb > 0 ? npb : 1), sizeof(int));
    if (!*start || !*len) return -1;
    for (int i = 0, s = 0; i < npb; ++i) {
        const int l = (n - s) / (npb - i) + ((n - s) % (npb - i) ? 1 : 0);
        (*start)[i] = s;
        (*len)[i] = l;
        s += l;
    }
    return npb;
}

static int geom_init(geom_t *g, int H, int W, int s, int kh, int kw, int ph, int pw) {
    memset(g, 0, sizeof(*g));
    g->H = H; g->W = W; g->s = s; g->ph = ph; g->pw = pw;
    g->Ho = (H + 2 * ph - kh) / s + 1;
    g->Wo = (W + 2 * pw - kw) / s + 1;
    if (s == 1) {
        g->Wp = W + pw;
        g->PS = (H + 2 * ph) * g->Wp + pw;  /* + pw: the last row's right border */
        g->first = ph * g->Wp;
        g->lead = pw + VL;
        g->slack = 2 * VL + ph * g->Wp + pw;
    } else {
        g->Wp = g->Wo + (kw - 1) / 2;
        g->Hq = g->Ho + (kh - 1) / 2;
        g->QS = g->Hq * g->Wp;
        g->PS = 4 * g->QS;
        g->first = 0;
        g->lead = VL;
        g->slack = 2 * VL + 2 * g->Wp + 2;
    }
    const int count = g->Ho * g->Wp;
    g->nchunk = (count + VL - 1) / VL;
    g->smask = (uint16_t *)calloc((size_t)g->nchunk, sizeof(uint16_t));
    g->sidx = (int *)calloc((size_t)g->nchunk, sizeof(int));
    g->npb = balanced_runs(g->nchunk, &g->pb_start, &g->pb_len);
    if (!g->smask || !g->sidx || g->npb < 0) return -1;
    for (int q = 0; q < g->nchunk; ++q) {
        int found = 0;
        for (int l = 0; l < VL; ++l) {
            const int pos = q * VL + l;  /* relative to first */
            if (pos >= count) break;
            const int r = pos / g->Wp, c = pos % g->Wp;
            if (c >= g->Wo) continue;
            g->smask[q] |= (uint16_t)(1u << l);
            if (!found) { g->sidx[q] = r * g->Wo + c; found = 1; }
        }
    }
    if (s != 1) return 0;
    const int HW = H * W;
    g->dchunk = (HW + VL - 1) / VL;
    g->dcentre = (kh / 2) * kw + kw / 2;
    g->dnpb = balanced_runs(g->dchunk, &g->dpb_start, &g->dpb_len);
    g->dmask = (uint16_t *)calloc((size_t)kh * kw * g->dchunk, sizeof(uint16_t));
    if (g->dnpb < 0 || !g->dmask) return -1;
    for (int u = 0; u < kh; ++u)
        for (int v = 0; v < kw; ++v) {
            uint16_t *row = g->dmask + (size_t)(u * kw + v) * g->dchunk;
            for (int p = 0; p < HW; ++p) {
                const int r = p / W + u - kh / 2, c = p % W + v - kw / 2;
                if (r >= 0 && r < H && c >= 0 && c < W) row[p / VL] |= (uint16_t)(1u << (p % VL));
            }
        }
    return 0;
}

static void geom_free(geom_t *g) {
    free(g->smask); free(g->sidx); free(g->pb_start); free(g->pb_len);
    free(g->dpb_start); free(g->dpb_len); free(g->dmask);
}

/*
 * Geometries are cached per calling thread (the last GEOM_CACHE shapes, replaced in turn):
 * a model calls the same few shapes over and over, and building one (its chunk masks and
 * indices) costs microseconds a batch-1 layer notices. Each is reference-counted: the
 * cache holds one reference, a prepared pass (fwd_plan) another, so a pass keeps its
 * geometries however many shapes it looks up after them. References are taken and
 * dropped by the thread whose cache made the geometry (other threads only read it).
 */
#define GEOM_CACHE 8
typedef struct { int key[5]; geom_t *g; } geom_slot_t;
static _Thread_local geom_slot_t geom_cache[GEOM_CACHE];
static _Thread_local int geom_next;

/*
 * Per-thread scratch (the geometry cache above, the padded-image buffer below) is freed
 * when its thread exits, by a pthread key destructor armed on the thread's first
 * allocation: a program that calls the kernel from many short-lived threads (one per
 * request, say; each also gets its own OpenMP team) would otherwise keep every dead
 * thread's buffers. hetconv_native_release() frees it on demand; scratch_held counts what
 * all threads hold (bytes of padded-image buffers, cached geometries).
 */
static long scratch_held[2];
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;
static _Thread_local int scratch_armed;
static long release_thread(void);

static void scratch_destructor(void *unused) {
    (void)unused;
    release_thread();
}

static void scratch_key_init(void) {
    scratch_key_ok = pthread_key_create(&scratch_key, scratch_destructor) == 0;
}

/* Arms this thread's exit-time release (once per thread). */
static void scratch_arm(void) {
    if (scratch_armed) return;
    pthread_once(&scratch_once, scratch_key_init);
    if (scratch_key_ok && pthread_setspecific(scratch_key, (void *)1) == 0) scratch_armed = 1;
}

static void scratch_count(int which, long delta) {
    __atomic_add_fetch(&scratch_held[which], delta, __ATOMIC_RELAXED);
}

/* Drops a reference to g (NULL: nothing); the last one frees it. */
static void geom_unref(const geom_t *cg) {
    geom_t *g = (geom_t *)cg;
    if (!g || --g->refs > 0) return;
    geom_free(g);
    free(g);
    scratch_count(1, -1);
}

static const geom_t *geom_ref(const geom_t *g) {
    if (g) ++((geom_t *)g)->refs;
    return g;
}

/* The geometry of an H x W input, stride s, kernel kh x kw, padding (kh / 2, kw / 2); NULL
 * when out of memory. Valid until this thread's next GEOM_CACHE new shapes, or for as long
 * as a reference taken with geom_ref() is held. */
static const geom_t *geom_get(int H, int W, int s, int kh, int kw) {
    const int key[5] = {H, W, s, kh, kw};
    for (int i = 0; i < GEOM_CACHE; ++i)
        if (geom_cache[i].g && memcmp(geom_cache[i].key, key, sizeof(key)) == 0)
            return geom_cache[i].g;
    geom_slot_t *slot = &geom_cache[geom_next];
    geom_next = (geom_next + 1) % GEOM_CACHE;
    geom_unref(slot->g);
    slot->g = NULL;
    scratch_arm();
    geom_t *g = (geom_t *)calloc(1, sizeof(geom_t));
    if (!g) return NULL;
    if (geom_init(g, H, W, s, kh, kw, kh / 2, kw / 2)) {
        geom_free(g);
        free(g);
        return NULL;
    }
    g->refs = 1;
    scratch_count(1, 1);
    memcpy(slot->key, key, sizeof(key));
    slot->g = g;
    return g;
}

/*
 * Whether the stride-1 forward pass reads the input in place (direct_kernel_n) rather than
 * from padded copies: where that computes at least 10% fewer chunks (the padded geometry
 * also computes the zero column after each row), as on 4x4 and 8x8 planes.  Where the
 * counts are close the padded copies are as fast or faster, measured on the project's
 * machine: they spread the channel planes over the L1 sets, where planes of a power-of-two
 * size map the same pixel of every channel to one set.  The AVX-512 build only.
 */
static int reads_in_place(const geom_t *g) {
#if defined(__AVX512F__)
    return g->s == 1 && 10 * g->dchunk <= 9 * g->nchunk;
#else
    (void)g;
    return 0;
#endif
}

int hetconv_native_reads_in_place(int H, int W, int kh, int kw) {
    if (H < 1 || W < 1 || kh < 1 || kw < 1 || kh % 2 == 0 || kw % 2 == 0) return -1;
    const geom_t *g = geom_get(H, W, 1, kh, kw);
    return g ? reads_in_place(g) : -2;
}

/* Offset of kernel tap (u, v) from a computed position, within a channel's storage. */
static int geom_tap(const geom_t *g, int u, int v) {
    if (g->s == 1) return (u - g->ph) * g->Wp + (v - g->pw);
    return ((u % 2) * 2 + v % 2) * g->QS + (u / 2) * g->Wp + v / 2;
}

static inline void copy_row(float *dst, const float *src, int n) {
#if defined(__AVX512F__)
    int w = 0;
    for (; w + VL <= n; w += VL) _mm512_storeu_ps(dst + w, _mm512_loadu_ps(src + w));
    if (w < n) {
        const __mmask16 m = (__mmask16)((1u << (n - w)) - 1u);
        _mm512_mask_storeu_ps(dst + w, m, _mm512_maskz_loadu_ps(m, src + w));
    }
#else
    memcpy(dst, src, sizeof(float) * (size_t)n);
#endif
}

/* dst[k] = src[2k] for k < n (the even elements of 2n - 1 floats). */
static inline void copy_even(float *dst, const float *src, int n) {
    int k = 0;
#if defined(__AVX512F__)
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    for (; k + VL <= n; k += VL) {
        const __mmask16 hi = (__mmask16)(k + VL < n ? 0xFFFF : 0x7FFF);  /* never past 2n - 1 */
        const __m512 a = _mm512_loadu_ps(src + 2 * k);
        const __m512 b = _mm512_maskz_loadu_ps(hi, src + 2 * k + VL);
        _mm512_storeu_ps(dst + k, _mm512_permutex2var_ps(a, even, b));
    }
#endif
    for (; k < n; ++k) dst[k] = src[2 * k];
}

/* Zero-padded copy of one image's M planes (borders of buf are already zero); the source's
 * planes are cs floats apart and its rows rs (H * W and W for contiguous NCHW). */
static void pad_image(const float *xb, float *buf, int M, const geom_t *g, size_t cs, int rs) {
    const int H = g->H, W = g->W;
    for (int c = 0; c < M; ++c) {
        const float *src = xb + (size_t)c * cs;
        float *base = buf + (size_t)c * g->PS;
        if (g->s == 1) {
            float *dst = base + g->ph * g->Wp;
            for (int r = 0; r < H; ++r) copy_row(dst + (size_t)r * g->Wp, src + (size_t)r * rs, W);
            continue;
        }
        for (int r = 0; r < H; ++r) {  /* padded row r + ph: phase row (r + ph) % 2 */
            const int pr = r + g->ph, a = pr % 2, i = pr / 2;
            if (i >= g->Hq) continue;
            for (int b = 0; b < 2; ++b) {
                /* padded column 2j + b = input column 2j + b - pw, inside [0, W) */
                int j0 = (g->pw - b + 1) / 2;
                if (j0 < 0) j0 = 0;
                int j1 = (W - 1 + g->pw - b) / 2;  /* last j with column < W */
                if (j1 > g->Wp - 1) j1 = g->Wp - 1;
                if (j1 < j0) continue;
                float *dst = base + (a * 2 + b) * g->QS + (size_t)i * g->Wp + j0;
                copy_even(dst, src + (size_t)r * rs + 2 * j0 + b - g->pw, j1 - j0 + 1);
            }
        }
    }
}

/*
 * The forward pass's padded-image buffer, one per thread, kept between calls (OpenMP's
 * threads persist): pad_image writes only the interior of the padded planes, so a call
 * with the geometry of the thread's previous call finds the borders still zero and skips
 * zeroing (and allocating) the buffer. Held until the thread exits or
 * hetconv_native_release() (a few MB at most: the largest padded image the thread has seen).
 */
typedef struct { float *buf; size_t len; int key[6]; } pad_cache_t;  /* key fixes the size */
static _Thread_local pad_cache_t pad_cache;

static float *pad_buffer(size_t len, const int key[6]) {
    pad_cache_t *c = &pad_cache;
    if (c->buf && memcmp(c->key, key, sizeof(c->key)) == 0) return c->buf;
    if (c->len < len) {
        scratch_count(0, -(long)(c->len * sizeof(float)));
        free(c->buf);
        scratch_arm();
        c->buf = (float *)malloc(len * sizeof(float));
        c->len = c->buf ? len : 0;
        scratch_count(0, (long)(c->len * sizeof(float)));
        if (!c->buf) return NULL;
    }
    memset(c->buf, 0, len * sizeof(float));
    memcpy(c->key, key, sizeof(c->key));
    return c->buf;
}

/* Frees the calling thread's scratch; returns the bytes of padded-image buffer freed. */
static long release_thread(void) {
    pad_cache_t *c = &pad_cache;
    const long bytes = (long)(c->len * sizeof(float));
    free(c->buf);
    memset(c, 0, sizeof(*c));
    scratch_count(0, -bytes);
    for (int i = 0; i < GEOM_CACHE; ++i) {
        geom_unref(geom_cache[i].g);
        geom_cache[i].g = NULL;
    }
    geom_next = 0;
    return bytes;
}

/*
 * Frees the scratch of the calling thread and of the OpenMP team of nthreads threads it
 * runs the kernels in (the next call allocates again); returns the bytes of padded-image
 * buffers freed.  Threads outside that team keep theirs until they exit.  Not to be
 * called while the calling thread has a kernel call running (it cannot: the call blocks).
 */
long hetconv_native_release(int nthreads) {
    long freed = 0;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) reduction(+ : freed)
    freed += release_thread();
    return freed;
}

/* What all threads hold: out[0] bytes of padded-image buffers, out[1] cached geometries. */
void hetconv_native_scratch(long *out) {
    out[0] = __atomic_load_n(&scratch_held[0], __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&scratch_held[1], __ATOMIC_RELAXED);
}

/*
 * What the forward and weight-gradient kernels share: the argument check, the
 * geometry and the entry offsets (pe: the centre tap of each of the M input
 * channels; te: per class, the Mk * T other taps of its channels).  Returns 0,
 * or a negative code with nothing left allocated.
 */
/* Output length of a stride-s convolution of n positions by a k tap kernel, padding k / 2. */
static inline int out_len(int n, int k, int s) { return (n + 2 * (k / 2) - k) / s + 1; }

static int args_ok(int B, int M, int N, int H, int W, int nblk, int P, int Mk, int T,
                   int stride, int kh, int kw) {
    return !(B < 0 || M < 1 || N < 1 || H < 1 || W < 1 || nblk < 1 || P < 1 || Mk < 0 ||
             T < 0 || (stride != 1 && stride != 2) || kh < 1 || kw < 1 || kh % 2 == 0 ||
             kw % 2 == 0);
}

/* Entry offsets of the padded geometry g: pe[c], channel c's centre tap (M of them), and
 * te[p * Mk * T + j * T + t], tap t of the j-th channel of class p. */
static void padded_entries(const geom_t *g, int *pe, int *te, int M, int P, int Mk,
                           const int *chan, int T, const int *tap_dh, const int *tap_dw, int kh,
                           int kw) {
    const int nte = Mk * T;
    for (int c = 0; c < M; ++c) pe[c] = c * g->PS + geom_tap(g, kh / 2, kw / 2);
    for (int p = 0; p < P; ++p)
        for (int j = 0; j < Mk; ++j)
            for (int t = 0; t < T; ++t)
                te[(size_t)p * nte + j * T + t] = chan[p * Mk + j] * g->PS +
                    geom_tap(g, tap_dh[t] + kh / 2, tap_dw[t] + kw / 2);
}

static int kernel_setup(geom_t *g, int **pe, int **te, int B, int M, int N, int H, int W,
                        int nblk, int P, int Mk, const int *chan, int T, const int *tap_dh,
                        const int *tap_dw, int stride, int kh, int kw) {
    *pe = *te = NULL;
    if (!args_ok(B, M, N, H, W, nblk, P, Mk, T, stride, kh, kw)) return -1;
    const geom_t *cached = geom_get(H, W, stride, kh, kw);
    if (!cached) return -2;
    *g = *cached;  /* its arrays belong to the cache */
    const int nte = Mk * T;
    *pe = (int *)malloc(sizeof(int) * (size_t)M);
    *te = (int *)malloc(sizeof(int) * (size_t)P * (size_t)(nte > 0 ? nte : 1));
    if (!*pe || !*te) {
        free(*pe); free(*te); *pe = *te = NULL;
        return -2;
    }
    padded_entries(g, *pe, *te, M, P, Mk, chan, T, tap_dh, tap_dw, kh, kw);
    return 0;
}

#if defined(__AVX512F__)
/* In a micro-kernel (acc[NB][NCMAX], nch chunks, bias): every accumulator starts at its
 * filter's bias; filter i adds wv times the loaded vectors v[k]. */
#define ACC_INIT()                                                                 \
    _Pragma("GCC unroll 4") for (int i = 0; i < NB; ++i) {                         \
        const __m512 bv = _mm512_set1_ps(bias ? bias[i] : 0.f);                    \
        _Pragma("GCC unroll 8") for (int k = 0; k < nch; ++k) acc[i][k] = bv;      \
    }
#define FMAS(i, wv)                                                                \
    do {                                                                           \
        const __m512 wb_ = _mm512_set1_ps(wv);                                     \
        _Pragma("GCC unroll 8") for (int k = 0; k < nch; ++k)                      \
            acc[i][k] = _mm512_fmadd_ps(wb_, v[k], acc[i][k]);                     \
    } while (0)

/*
 * 4 filters x nch chunks of 16 positions (nch <= NCMAX, a literal at every
 * call so the loops unroll and the accumulators stay in registers).  ``pe``
 * (np entries): offsets of the centre taps (one per input channel), weights
 * ``w1`` (np x 4).  Tap entries: when ``shared``, the 4 filters share one
 * class: ``te[0]`` (nt entries), weights ``wk`` (nt x 4); otherwise filter
 * i's taps are ``te[i]``, weights ``wk[e*4 + i]``.
 */
static inline __attribute__((always_inline)) void
micro_kernel_n(const int nch, const float *xp, float *const yo[NB], const float *const ro[NB],
               const geom_t *g, int q0,
               int np, const int *pe, const float *w1, int nt, const int *const te[NB],
               int shared, const float *wk, const float *bias, int relu, int layouts) {
    const float *x0 = xp + g->first + q0 * VL;
    __m512 acc[NB][NCMAX];
    ACC_INIT();
#define LOADS(xe)                                                                  \
    __m512 v[NCMAX];                                                               \
    _Pragma("GCC unroll 8") for (int k = 0; k < nch; ++k) v[k] = _mm512_loadu_ps((xe) + k * VL);
    for (int e = 0; e < np; ++e) {
        LOADS(x0 + pe[e]);
        const float *w = w1 + 4 * e;
        FMAS(0, w[0]); FMAS(1, w[1]); FMAS(2, w[2]); FMAS(3, w[3]);
    }
    if (shared) {
        const int *t0 = te[0];
        for (int e = 0; e < nt; ++e) {
            LOADS(x0 + t0[e]);
            const float *w = wk + 4 * e;
            FMAS(0, w[0]); FMAS(1, w[1]); FMAS(2, w[2]); FMAS(3, w[3]);
        }
    } else {
#pragma GCC unroll 4
        for (int i = 0; i < NB; ++i) {
            const int *ti = te[i];
            if (!ti) continue;
            for (int e = 0; e < nt; ++e) {
                LOADS(x0 + ti[e]);
                FMAS(i, wk[4 * e + i]);
            }
        }
    }
#undef LOADS
    const __m512 zero = _mm512_setzero_ps();
    const int count = g->Ho * g->Wp;  /* computed positions (padded layouts: their extent) */
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) {
        if (!yo[i]) continue;
#pragma GCC unroll 8
        for (int k = 0; k < nch; ++k) {
            const __mmask16 m = (__mmask16)g->smask[q0 + k];
            const int pos = (q0 + k) * VL;
            __m512 r = acc[i][k];
            if (ro[i])
                r = _mm512_add_ps(r, (layouts & LAYOUT_RES_PADDED)
                                         ? _mm512_maskz_loadu_ps(m, ro[i] + pos)
                                         : _mm512_maskz_expandloadu_ps(m, ro[i] + g->sidx[q0 + k]));
            if (relu) r = _mm512_max_ps(r, zero);
            if (layouts & LAYOUT_Y_PADDED) {  /* every position, the thrown-away ones as zeros */
                const int left = count - pos;
                const __mmask16 keep = (__mmask16)(left >= VL ? 0xFFFFu : (1u << left) - 1u);
                _mm512_mask_storeu_ps(yo[i] + pos, keep, _mm512_maskz_mov_ps(m, r));
                continue;
            }
            r = _mm512_maskz_compress_ps(m, r);
            const __mmask16 dst = (__mmask16)((1u << __builtin_popcount(m)) - 1u);
            _mm512_mask_storeu_ps(yo[i] + g->sidx[q0 + k], dst, r);
        }
    }
}

static void micro_kernel(int nch, const float *xp, float *const yo[NB], const float *const ro[NB],
                         const geom_t *g, int q0, int np, const int *pe, const float *w1, int nt,
                         const int *const te[NB], int shared, const float *wk,
                         const float *bias, int relu, int layouts) {
    switch (nch) {
#define CASE(n) case n: micro_kernel_n(n, xp, yo, ro, g, q0, np, pe, w1, nt, te, shared, wk, bias, relu, layouts); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#undef CASE
        default: break;
    }
}

/*
 * Stride 1 without a copy.  At stride 1 the computed positions can be the H*W
 * pixels of the plane themselves, read in place from the input: tap (u, v) of
 * pixel p is at p + (u - ph) * W + (v - pw) in its channel's plane, and the
 * lanes whose tap falls outside the image (the border rows and columns a
 * padded copy would hold as zeros) are masked off in the load (a masked load
 * neither reads nor faults on them).  The masks depend on the tap and the
 * chunk only, so the tap loops run tap by tap, each tap's nch masks held in
 * mask registers over the channels of the class.  No padded copy, no thrown
 * away columns, and every chunk is written with one plain (tail-masked) store.
 * ``te``: per filter, the class's entries tap-major (t * Mk + j): the offset
 * of channel j's plane plus the tap's offset; ``tm``: each tap's mask row.
 */
#define DJ 16  /* channels per run of the tap loop */
static inline __attribute__((always_inline)) void
direct_kernel_n(const int nch, const float *x, float *const yo[NB], const float *const ro[NB],
                const geom_t *g, int q0, int M, size_t HW, const float *w1, int T, int Mk,
                const int *const te[NB], const int *tm, int shared, const float *wk,
                const float *bias, int relu) {
    const int p0 = q0 * VL;
    const float *x0 = x + p0;
    __m512 acc[NB][NCMAX];
    __mmask16 mk[NCMAX];
    ACC_INIT();
#define MASKS(row)                                                                 \
    do {                                                                           \
        const uint16_t *mr_ = g->dmask + (size_t)(row) * g->dchunk + q0;           \
        _Pragma("GCC unroll 8") for (int k = 0; k < nch; ++k) mk[k] = mr_[k];      \
    } while (0)
#define LOADS(xe)                                                                  \
    __m512 v[NCMAX];                                                               \
    _Pragma("GCC unroll 8") for (int k = 0; k < nch; ++k)                          \
        v[k] = _mm512_maskz_loadu_ps(mk[k], (xe) + k * VL);
    MASKS(g->dcentre);
    for (int c = 0; c < M; ++c) {
        LOADS(x0 + (size_t)c * HW);
        const float *w = w1 + 4 * c;
        FMAS(0, w[0]); FMAS(1, w[1]); FMAS(2, w[2]); FMAS(3, w[3]);
    }
    const int wstep = 4 * T;  /* weights of entry (j, t) at wk[4 * (j * T + t)] */
    if (shared) {
        /* channels in runs of DJ, so a run's planes stay in L1 over its T taps */
        for (int j0 = 0; j0 < Mk; j0 += DJ) {
            const int j1 = j0 + DJ < Mk ? j0 + DJ : Mk;
            for (int t = 0; t < T; ++t) {
                MASKS(tm[t]);
                const int *tt = te[0] + t * Mk;
                const float *w = wk + 4 * t + j0 * wstep;
                for (int j = j0; j < j1; ++j, w += wstep) {
                    LOADS(x0 + tt[j]);
                    FMAS(0, w[0]); FMAS(1, w[1]); FMAS(2, w[2]); FMAS(3, w[3]);
                }
            }
        }
    } else {
#pragma GCC unroll 4
        for (int i = 0; i < NB; ++i) {
            if (!te[i]) continue;
            for (int t = 0; t < T; ++t) {
                MASKS(tm[t]);
                const int *tt = te[i] + t * Mk;
                const float *w = wk + 4 * t + i;
                for (int j = 0; j < Mk; ++j, w += wstep) {
                    LOADS(x0 + tt[j]);
                    FMAS(i, w[0]);
                }
            }
        }
    }
#undef MASKS
#undef LOADS
    const __m512 zero = _mm512_setzero_ps();
    const uint16_t *cm = g->dmask + (size_t)g->dcentre * g->dchunk + q0;
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) {
        if (!yo[i]) continue;
#pragma GCC unroll 8
        for (int k = 0; k < nch; ++k) {
            const __mmask16 m = (__mmask16)cm[k];
            __m512 r = acc[i][k];
            if (ro[i]) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, ro[i] + p0 + k * VL));
            if (relu) r = _mm512_max_ps(r, zero);
            _mm512_mask_storeu_ps(yo[i] + p0 + k * VL, m, r);
        }
    }
}

static void direct_kernel(int nch, const float *x, float *const yo[NB], const float *const ro[NB],
                          const geom_t *g, int q0, int M, size_t HW, const float *w1, int T,
                          int Mk, const int *const te[NB], const int *tm, int shared,
                          const float *wk, const float *bias, int relu) {
    switch (nch) {
#define CASE(n) case n: direct_kernel_n(n, x, yo, ro, g, q0, M, HW, w1, T, Mk, te, tm, shared, wk, bias, relu); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#undef CASE
        default: break;
    }
}
#else
static void micro_kernel(int nch, const float *xp, float *const yo[NB], const float *const ro[NB],
                         const geom_t *g, int q0, int np, const int *pe, const float *w1,
                         int nt, const int *const te[NB], int shared, const float *wk,
                         const float *bias, int relu, int layouts) {
    (void)shared;
    const float *x0 = xp + g->first + q0 * VL;
    const int count = g->Ho * g->Wp;
    for (int k = 0; k < nch; ++k) {
        const int q = q0 + k;
        if (q >= g->nchunk) break;
        int o = g->sidx[q];
        for (int l = 0; l < VL; ++l) {
            const int pos = q * VL + l;
            if (pos >= count) break;
            const int yi = (layouts & LAYOUT_Y_PADDED) ? pos : o;
            const int ri = (layouts & LAYOUT_RES_PADDED) ? pos : o;
            if (!((g->smask[q] >> l) & 1)) {  /* a thrown-away position: zero in a padded y */
                if (layouts & LAYOUT_Y_PADDED)
                    for (int i = 0; i < NB; ++i)
                        if (yo[i]) yo[i][yi] = 0.f;
                continue;
            }
            const float *xl = x0 + k * VL + l;
            for (int i = 0; i < NB; ++i) {
                if (!yo[i]) continue;
                float acc = bias ? bias[i] : 0.f;
                for (int e = 0; e < np; ++e) acc += w1[4 * e + i] * xl[pe[e]];
                const int *ti = te[i] ? te[i] : te[0];
                if (te[i])
                    for (int e = 0; e < nt; ++e) acc += wk[4 * e + i] * xl[ti[e]];
                if (ro[i]) acc += ro[i][ri];
                yo[i][yi] = (relu && acc < 0.f) ? 0.f : acc;
            }
            ++o;
        }
    }
}
#endif

/*
 * Filter block blk's output planes yo and residual planes ro (within one image's yb and rb,
 * planes ys and rs floats apart; NULL for unused slots or without a residual) and tap entries tei (its slots' classes'
 * rows of te, nte each).  Returns 1 when its used slots share one class.
 */
static int block_setup(int blk, const int *blk_cls, const int *blk_out, float *yb,
                       const float *rb, size_t ys, size_t rs, const int *te, int nte,
                       float *yo[NB], const float *ro[NB], const int *tei[NB]) {
    const int *bc = blk_cls + (size_t)blk * NB, *bo = blk_out + (size_t)blk * NB;
    int shared = 1, c0 = -1;
    for (int i = 0; i < NB; ++i) {
        yo[i] = bo[i] >= 0 ? yb + (size_t)bo[i] * ys : NULL;
        ro[i] = (rb && bo[i] >= 0) ? rb + (size_t)bo[i] * rs : NULL;
        tei[i] = bc[i] >= 0 ? te + (size_t)bc[i] * nte : NULL;
        if (bc[i] >= 0) {
            if (c0 < 0) c0 = bc[i];
            else if (bc[i] != c0) shared = 0;
        }
    }
    return shared && tei[0];
}

/* Work items of a forward pass over B images and nblk filter blocks: (image, group of
 * blocks), groups only when images are too few for the threads. */
static int block_groups(int B, int nblk, int nthreads) {
    int groups = 1;
    while ((long)B * groups < 2L * nthreads && groups < nblk) ++groups;
    return groups;
}

/*
 * The forward pass with every argument but the tensors and the thread count in one
 * struct: a prepared call (hetconv/native.py) builds it once, so a call converts 5
 * arguments instead of 27 (about 2.4 us less per call from Python's ctypes).
 *   blk_out (nblk, 4): output plane of each filter slot, -1 unused;
 *   blk_cls (nblk, 4): the class of each slot (-1 unused); a block whose used slots share
 *     one class runs the shared-tap loop;
 *   w1p (nblk, M, 4), wkp (nblk, Mk*T, 4), bp (nblk, 4) or NULL;
 *   chan (P, Mk): input channels of each class; tap_dh/dw (T): tap offsets;
 *   stride 1 or 2, padding (kh / 2, kw / 2); relu: max(0, .) after the residual sum.
 */
typedef struct {
    int B, M, N, H, W, nblk;
    const int *blk_cls, *blk_out;
    const float *w1p, *wkp, *bp;
    int P, Mk;
    const int *chan;
    int T;
    const int *tap_dh, *tap_dw;
    int stride, kh, kw, relu;
} hetconv_forward_args;

/*
 * Padded layouts.  Between two layers of the NCHW kernel an activation can stay in the
 * layout the kernel computes in: every plane (H, W) stored as the zero-padded plane of the
 * stride-1 geometry of its size (PS floats: ph zero rows, H rows of Wp = W + pw floats whose
 * last pw are zero, ph zero rows and pw zeros), planes one after another, with `lead` zeros
 * before the first plane and `slack` floats after the last.  Pixel (r, c) of plane k is at
 * k * PS + (ph + r) * Wp + c from the first plane's start.  A layer writing its output so
 * (zeros included) saves the next layer its padded copy, and writes every chunk with a
 * plain store instead of a compress.  The pointers the forward pass takes are those of
 * pixel (0, 0) of plane 0.  Used inside hetconv_native_chain, where the activations stay in
 * per-thread buffers in L2 (between calls, reading them from L3 cost more than the copy
 * they save: docs/performance.md, ninth session).
 */

/* A prepared forward pass of one layer on images of one size (see plan_init). */
typedef struct {
    hetconv_forward_args a;
    const geom_t *g;    /* the computing geometry (referenced) */
    const geom_t *gi;   /* stride-1 geometry of the input size: a padded x (referenced) */
    const geom_t *go;   /* ... of the output size: a padded y or residual (referenced) */
    int direct;         /* stride 1, read in place (direct_kernel_n) */
    int layouts, Ho, Wo, nte;
    size_t xs, ys, rs;  /* plane strides of x, y and the residual */
    int xrs;            /* row stride of x */
    int *pe, *te, *tm;  /* entry offsets (padded: pe, te; in place: te, tm) */
} fwd_plan;

static void plan_free(fwd_plan *pl) {
    geom_unref(pl->g); geom_unref(pl->gi); geom_unref(pl->go);
    free(pl->pe); free(pl->te); free(pl->tm);
    memset(pl, 0, sizeof(*pl));
}

/* Prepares the pass of layer a with the given layouts (LAYOUT_* bits: x, y and the residual
 * contiguous NCHW where clear, else in the padded layout of their plane size with kernel
 * (kh, kw)).  Returns 0, or a negative code with nothing held. */
static int plan_init(fwd_plan *pl, const hetconv_forward_args *a, int layouts) {
    memset(pl, 0, sizeof(*pl));
    pl->a = *a;
    const int M = a->M, H = a->H, W = a->W, P = a->P, Mk = a->Mk, T = a->T;
    const int kh = a->kh, kw = a->kw, s = a->stride;
    if (!args_ok(a->B, M, a->N, H, W, a->nblk, P, Mk, T, s, kh, kw) || (layouts & ~LAYOUT_ALL))
        return -1;
    pl->layouts = layouts;
    pl->Ho = out_len(H, kh, s);
    pl->Wo = out_len(W, kw, s);
    pl->nte = Mk * T;
    if (!(pl->g = geom_ref(geom_get(H, W, s, kh, kw)))) return -2;
    if ((layouts & LAYOUT_X_PADDED) && !(pl->gi = geom_ref(geom_get(H, W, 1, kh, kw)))) {
        plan_free(pl);
        return -2;
    }
    if ((layouts & (LAYOUT_Y_PADDED | LAYOUT_RES_PADDED)) &&
        !(pl->go = geom_ref(geom_get(pl->Ho, pl->Wo, 1, kh, kw)))) {
        plan_free(pl);
        return -2;
    }
    const geom_t *g = pl->g;
    const int HWo = pl->Ho * pl->Wo, nte = pl->nte;
    pl->direct = !layouts && reads_in_place(g);
    pl->xs = pl->gi ? (size_t)pl->gi->PS : (size_t)H * W;
    pl->xrs = pl->gi ? pl->gi->Wp : W;
    pl->ys = (layouts & LAYOUT_Y_PADDED) ? (size_t)pl->go->PS : (size_t)HWo;
    pl->rs = (layouts & LAYOUT_RES_PADDED) ? (size_t)pl->go->PS : (size_t)HWo;
    pl->te = (int *)malloc(sizeof(int) * (size_t)P * (size_t)(nte > 0 ? nte : 1));
    if (pl->direct) pl->tm = (int *)malloc(sizeof(int) * (size_t)(T > 0 ? T : 1));
    else pl->pe = (int *)malloc(sizeof(int) * (size_t)M);
    if (!pl->te || (pl->direct ? !pl->tm : !pl->pe)) {
        plan_free(pl);
        return -2;
    }
    if (pl->direct) {  /* per class, tap-major: channel plane + the tap's offset; tap masks */
        for (int t = 0; t < T; ++t) pl->tm[t] = (a->tap_dh[t] + kh / 2) * kw + a->tap_dw[t] + kw / 2;
        for (int p = 0; p < P; ++p)
            for (int t = 0; t < T; ++t)
                for (int j = 0; j < Mk; ++j)
                    pl->te[(size_t)p * nte + t * Mk + j] =
                        a->chan[p * Mk + j] * H * W + a->tap_dh[t] * W + a->tap_dw[t];
        return 0;
    }
    padded_entries(g, pl->pe, pl->te, M, P, Mk, a->chan, T, a->tap_dh, a->tap_dw, kh, kw);
    return 0;
}

/* Bytes of the per-thread buffer a pass copies its input into (0: it reads in place). */
static size_t plan_buffer_len(const fwd_plan *pl) {
    if (pl->direct || ((pl->layouts & LAYOUT_X_PADDED) && pl->a.stride == 1)) return 0;
    return (size_t)pl->g->lead + (size_t)pl->a.M * pl->g->PS + (size_t)pl->g->slack;
}

/*
 * Filter blocks [blk0, blk1) of one image: xb, yb, rb point at the image's input, output and
 * residual (NULL: none) in the plan's layouts.  buf: the thread's buffer for the padded copy
 * (plan_buffer_len floats, borders zero; unused when the pass reads in place), and copy:
 * whether to make it (else it holds this image already).
 */
static void plan_image(const fwd_plan *pl, const float *xb, float *yb, const float *rb,
                       int blk0, int blk1, float *buf, int copy) {
    const hetconv_forward_args *a = &pl->a;
    const geom_t *g = pl->g;
    const int M = a->M, nte = pl->nte;
#if defined(__AVX512F__)
    if (pl->direct) {
        const size_t HW = (size_t)a->H * a->W;
        for (int pb = 0; pb < g->dnpb; ++pb) {
            const int q0 = g->dpb_start[pb], nch = g->dpb_len[pb];
            for (int blk = blk0; blk < blk1; ++blk) {
                float *yo[NB];
                const float *ro[NB];
                const int *tei[NB];
                const int shared = block_setup(blk, a->blk_cls, a->blk_out, yb, rb, HW, HW,
                                               pl->te, nte, yo, ro, tei);
                direct_kernel(nch, xb, yo, ro, g, q0, M, HW, a->w1p + (size_t)blk * M * NB,
                              a->T, a->Mk, tei, pl->tm, shared, a->wkp + (size_t)blk * nte * NB,
                              a->bp ? a->bp + (size_t)blk * NB : NULL, a->relu);
            }
        }
        return;
    }
#endif
    const float *xp;  /* the padded image: its first plane's storage */
    if ((pl->layouts & LAYOUT_X_PADDED) && a->stride == 1) {
        xp = xb - g->first;
    } else {
        if (copy) pad_image(xb, buf + g->lead, M, g, pl->xs, pl->xrs);
        xp = buf + g->lead;
    }
    if (pl->layouts & LAYOUT_Y_PADDED) {  /* the zero rows of these blocks' output planes */
        const geom_t *go = pl->go;
        const int count = g->Ho * g->Wp;
        for (int k = blk0 * NB; k < blk1 * NB; ++k) {
            if (a->blk_out[k] < 0) continue;
            float *plane = yb + (size_t)a->blk_out[k] * pl->ys;
            memset(plane - go->first, 0, sizeof(float) * (size_t)go->first);
            memset(plane + count, 0, sizeof(float) * (size_t)(go->PS - go->first - count));
        }
    }
    for (int pb = 0; pb < g->npb; ++pb) {
        const int q0 = g->pb_start[pb], nch = g->pb_len[pb];
        for (int blk = blk0; blk < blk1; ++blk) {
            float *yo[NB];
            const float *ro[NB];
            const int *tei[NB];
            const int shared = block_setup(blk, a->blk_cls, a->blk_out, yb, rb, pl->ys, pl->rs,
                                           pl->te, nte, yo, ro, tei);
            micro_kernel(nch, xp, yo, ro, g, q0, M, pl->pe, a->w1p + (size_t)blk * M * NB,
                         nte, tei, shared, a->wkp + (size_t)blk * nte * NB,
                         a->bp ? a->bp + (size_t)blk * NB : NULL, a->relu, pl->layouts);
        }
    }
}

/*
 * y (B, N, Ho, Wo) = HetConv(x (B, M, H, W)) for the layer in a, plus res (B, N, Ho, Wo;
 * NULL: none) before the ReLU, all contiguous NCHW (layouts 0) or as the LAYOUT_* bits say
 * (padded x, y, res: a padded x must hold zeros where the layout has them; a padded y gets
 * them, and the zeros of `lead` before its first plane).  Returns 0, or a negative code
 * (bad arguments, out of memory).
 */
static int forward_impl(const hetconv_forward_args *a, const float *x, float *y,
                        const float *res, int layouts, int nthreads) {
    fwd_plan pl;
    const int rc = plan_init(&pl, a, layouts);
    if (rc) return rc;
    if (nthreads < 1) nthreads = 1;
    const int B = a->B, M = a->M, N = a->N, nblk = a->nblk;
    const int groups = block_groups(B, nblk, nthreads);
    const int per_group = (nblk + groups - 1) / groups;
    const long total = (long)B * groups;
    const size_t buf_len = plan_buffer_len(&pl);
    if (layouts & LAYOUT_Y_PADDED)  /* the zeros before the first plane */
        memset(y - pl.go->first - pl.go->lead, 0, sizeof(float) * (size_t)pl.go->lead);
    int status = 0;
#pragma omp parallel num_threads(nthreads) if (total > 1)
    {
        const int key[6] = {M, a->H, a->W, a->stride, a->kh, a->kw};
        float *buf = buf_len ? pad_buffer(buf_len, key) : NULL;
        int last_b = -1;
        if (buf_len && !buf) {
#pragma omp atomic write
            status = -2;
        }
#pragma omp for schedule(static)
        for (long it = 0; it < total; ++it) {
            if (buf_len && !buf) continue;
            const int b = (int)(it / groups), grp = (int)(it % groups);
            const int end = (grp + 1) * per_group < nblk ? (grp + 1) * per_group : nblk;
            plan_image(&pl, x + (size_t)b * M * pl.xs, y + (size_t)b * N * pl.ys,
                       res ? res + (size_t)b * N * pl.rs : NULL, grp * per_group, end, buf,
                       b != last_b);
            last_b = b;
        }
    }
    plan_free(&pl);
    return status;
}

int hetconv_native_forward(const float *x, float *y, int B, int M, int N, int H, int W,
                           int nblk, const int *blk_cls, const int *blk_out,
                           const float *w1p, const float *wkp, const float *bp,
                           int P, int Mk, const int *chan, int T, const int *tap_dh,
                           const int *tap_dw, int stride, int kh, int kw, const float *res,
                           int relu, int nthreads) {
    const hetconv_forward_args a = {B, M, N, H, W, nblk, blk_cls, blk_out, w1p, wkp, bp, P, Mk,
                                    chan, T, tap_dh, tap_dw, stride, kh, kw, relu};
    return forward_impl(&a, x, y, res, 0, nthreads);
}

int hetconv_native_forward_packed(const hetconv_forward_args *a, const float *x, float *y,
                                  const float *res, int nthreads) {
    return forward_impl(a, x, y, res, 0, nthreads);
}

/*
 * A chain of layers run image by image (depth-first).  Each thread takes whole images and
 * runs every op of the chain on one image before the next, so the activations between the
 * ops stay in small per-thread buffers in L2, in the padded layout the next layer reads in
 * place (no copy, plain stores), instead of going through memory as whole-batch tensors,
 * layer by layer, each call starting its threads.
 *
 * ops[i]: what it computes (kind CHAIN_CONV: layer is a hetconv_forward_args; kind
 * CHAIN_SHORTCUT: layer is a hetconv_shortcut_args) and where its input, residual and
 * output are: CHAIN_X or CHAIN_X2 (the chain's inputs x and x2, contiguous NCHW; x2 may be
 * NULL when no op reads it), CHAIN_Y (the chain's output y, contiguous NCHW: the last op's
 * output, and only it), CHAIN_NONE (no residual), or a buffer 0 .. nbuf - 1 an earlier op
 * wrote.  The layers' B is ignored: x holds B images.  All layers have one kernel size.
 * Returns 0, or a negative code (-1: an inconsistent chain, -2: out of memory).
 */
#define CHAIN_X (-1)
#define CHAIN_Y (-2)
#define CHAIN_NONE (-3)
#define CHAIN_X2 (-4)
#define CHAIN_CONV 0
#define CHAIN_SHORTCUT 1
typedef struct {
    const void *layer;
    int in, res, out, kind;
} hetconv_chain_op;

/* The parameter-free shortcut of the CIFAR ResNets ("option A"), in any channel order:
 * output channel n (N of them) is input channel src[n] (M of them) subsampled by stride
 * (rows and columns 0, stride, 2 stride, ...), or zeros where src[n] < 0. */
typedef struct {
    int M, H, W, N, stride;
    const int *src;
} hetconv_shortcut_args;

/* Output channels [n0, n1) of one image of a shortcut: x planes xcs floats apart, rows xrs;
 * y likewise, or (go) in the padded layout of go (the whole plane written, zeros included). */
static void shortcut_image(const hetconv_shortcut_args *sa, const float *xb, size_t xcs,
                           int xrs, float *yb, size_t ycs, int yrs, const geom_t *go, int n0,
                           int n1) {
    const int s = sa->stride, Ho = (sa->H - 1) / s + 1, Wo = (sa->W - 1) / s + 1;
    for (int n = n0; n < n1; ++n) {
        float *plane = yb + (size_t)n * ycs;
        if (go) memset(plane - go->first, 0, sizeof(float) * (size_t)go->PS);
        const int c = sa->src[n];
        if (c < 0) {
            if (!go)
                for (int r = 0; r < Ho; ++r) memset(plane + (size_t)r * yrs, 0, sizeof(float) * (size_t)Wo);
            continue;
        }
        const float *xc = xb + (size_t)c * xcs;
        for (int r = 0; r < Ho; ++r) {
            const float *src = xc + (size_t)r * s * xrs;
            float *dst = plane + (size_t)r * yrs;
            if (s == 1) copy_row(dst, src, Wo);
            else if (s == 2) copy_even(dst, src, Wo);
            else for (int k = 0; k < Wo; ++k) dst[k] = src[(size_t)k * s];
        }
    }
}

typedef struct { int C, H, W, padded; } chain_shape;

/* A chain's inputs and output: pointers and floats per image. */
typedef struct { const float *x, *x2; float *y; size_t ximg, ximg2, ylen; } chain_io;

/* Where op reads and writes for image b (off: its offsets within its buffers). */
static inline void chain_ptrs(const chain_io *io, const hetconv_chain_op *op, const size_t *off,
                              float *const *bufs, int b, const float **xb, const float **rb,
                              float **yb) {
    const int in = op->in, res = op->res;
    *xb = in == CHAIN_X ? io->x + (size_t)b * io->ximg
        : in == CHAIN_X2 ? io->x2 + (size_t)b * io->ximg2 : bufs[in] + off[0];
    *rb = res == CHAIN_NONE ? NULL
        : res == CHAIN_X ? io->x + (size_t)b * io->ximg
        : res == CHAIN_X2 ? io->x2 + (size_t)b * io->ximg2 : bufs[res] + off[1];
    *yb = op->out == CHAIN_Y ? io->y + (size_t)b * io->ylen : bufs[op->out] + off[2];
}

/* Op op of a chain on one image, share tid of nt (its filter blocks, a shortcut's channels):
 * pl its plan (a layer), st its strides and go its padded output geometry (a shortcut),
 * buf the thread's buffer for its padded copy. */
static void chain_run_op(const hetconv_chain_op *op, const fwd_plan *pl, const size_t *st,
                         const geom_t *go, const float *xb, const float *rb, float *yb,
                         float *buf, int tid, int nt) {
    const int n = op->kind == CHAIN_SHORTCUT ? ((const hetconv_shortcut_args *)op->layer)->N
                                             : pl->a.nblk;
    const int per = (n + nt - 1) / nt, k0 = tid * per, k1 = k0 + per < n ? k0 + per : n;
    if (k0 >= k1) return;
    if (op->kind == CHAIN_SHORTCUT)
        shortcut_image(op->layer, xb, st[0], (int)st[1], yb, st[2], (int)st[3], go, k0, k1);
    else
        plan_image(pl, xb, yb, rb, k0, k1, buf, 1);
}

int hetconv_native_chain(const hetconv_chain_op *ops, int nops, int nbuf, const float *x,
                         const float *x2, float *y, int B, int nthreads) {
    if (!ops || nops < 1 || nbuf < 0 || nbuf > nops || nbuf > 64 || B < 0 || !x || !y)
        return -1;
    if (nthreads < 1) nthreads = 1;
    int kh = 0, kw = 0;  /* the chain's kernel size: its convolutions' */
    for (int i = 0; i < nops && !kh; ++i)
        if (ops[i].kind == CHAIN_CONV && ops[i].layer) {
            kh = ((const hetconv_forward_args *)ops[i].layer)->kh;
            kw = ((const hetconv_forward_args *)ops[i].layer)->kw;
        }
    if (!kh) return -1;
    chain_shape xs = {-1, 0, 0, 0}, xs2 = {-1, 0, 0, 0};
    chain_shape *cur = (chain_shape *)calloc((size_t)nbuf + 1, sizeof(chain_shape));
    size_t *buf_len = (size_t *)calloc((size_t)nbuf + 1, sizeof(size_t));
    fwd_plan *pl = (fwd_plan *)calloc((size_t)nops, sizeof(fwd_plan));
    const geom_t **sgo = (const geom_t **)calloc((size_t)nops, sizeof(geom_t *));  /* shortcuts' */
    size_t *off = (size_t *)calloc((size_t)nops * 3, sizeof(size_t));  /* in, res, out */
    size_t *stride_in = (size_t *)calloc((size_t)nops * 4, sizeof(size_t));  /* x, y plane/row */
    size_t *copy_at = (size_t *)calloc((size_t)nops + 1, sizeof(size_t));
    int status = (cur && buf_len && pl && sgo && off && stride_in && copy_at) ? 0 : -2;
    size_t lead = 0, ylen = 0;  /* the zeros every buffer starts with; y's floats per image */
    for (int i = 0; i < nops && !status; ++i) {
        const int in = ops[i].in, res = ops[i].res, out = ops[i].out, kind = ops[i].kind;
        const int ext_in = in == CHAIN_X || in == CHAIN_X2, ext_res = res == CHAIN_X || res == CHAIN_X2;
        if (!ops[i].layer || (kind != CHAIN_CONV && kind != CHAIN_SHORTCUT) ||
            (in < 0 && !ext_in) || in >= nbuf ||
            (res < 0 && !ext_res && res != CHAIN_NONE) || res >= nbuf ||
            (kind == CHAIN_SHORTCUT && res != CHAIN_NONE) ||
            ((in == CHAIN_X2 || res == CHAIN_X2) && !x2) ||
            (out != CHAIN_Y && (out < 0 || out >= nbuf)) || (out == CHAIN_Y) != (i == nops - 1) ||
            out == in || out == res) {
            status = -1;
            break;
        }
        const hetconv_forward_args *a = kind == CHAIN_CONV ? ops[i].layer : NULL;
        const hetconv_shortcut_args *sa = kind == CHAIN_SHORTCUT ? ops[i].layer : NULL;
        if (a && (a->kh != kh || a->kw != kw || !args_ok(1, a->M, a->N, a->H, a->W, a->nblk, a->P,
                                                        a->Mk, a->T, a->stride, kh, kw))) {
            status = -1;
            break;
        }
        if (sa && (sa->M < 1 || sa->N < 1 || sa->H < 1 || sa->W < 1 || sa->stride < 1 || !sa->src)) {
            status = -1;
            break;
        }
        if (sa)
            for (int n = 0; n < sa->N; ++n)
                if (sa->src[n] >= sa->M) status = -1;
        if (status) break;
        const int s = a ? a->stride : sa->stride;
        const int H = a ? a->H : sa->H, W = a ? a->W : sa->W;
        const int Ho = a ? out_len(H, kh, s) : (H - 1) / s + 1;
        const int Wo = a ? out_len(W, kw, s) : (W - 1) / s + 1;
        chain_shape want_in = {a ? a->M : sa->M, H, W, 0}, want_out = {a ? a->N : sa->N, Ho, Wo, 0};
        chain_shape *src = in == CHAIN_X ? &xs : in == CHAIN_X2 ? &xs2 : &cur[in];
        if (ext_in && src->C < 0) *src = want_in;
        if (src->C != want_in.C || src->H != want_in.H || src->W != want_in.W) { status = -1; break; }
        int layouts = src->padded ? LAYOUT_X_PADDED : 0;
        if (res != CHAIN_NONE) {
            chain_shape *r = res == CHAIN_X ? &xs : res == CHAIN_X2 ? &xs2 : &cur[res];
            if (ext_res && r->C < 0) *r = want_out;
            if (r->C != want_out.C || r->H != Ho || r->W != Wo) { status = -1; break; }
            if (r->padded) layouts |= LAYOUT_RES_PADDED;
        }
        const geom_t *go = geom_get(Ho, Wo, 1, kh, kw);
        if (!go) { status = -2; break; }
        if (out != CHAIN_Y && !reads_in_place(go)) {
            want_out.padded = 1;
            layouts |= LAYOUT_Y_PADDED;
        }
        const geom_t *gi = NULL;
        if (a) {
            if ((status = plan_init(&pl[i], a, layouts))) break;
            gi = pl[i].gi;
        } else {
            if (src->padded && !(gi = geom_get(H, W, 1, kh, kw))) { status = -2; break; }
            sgo[i] = want_out.padded ? geom_ref(go) : NULL;  /* go is still cached here */
            stride_in[4 * i] = gi ? (size_t)gi->PS : (size_t)H * W;
            stride_in[4 * i + 1] = gi ? (size_t)gi->Wp : (size_t)W;
            stride_in[4 * i + 2] = want_out.padded ? (size_t)go->PS : (size_t)Ho * Wo;
            stride_in[4 * i + 3] = want_out.padded ? (size_t)go->Wp : (size_t)Wo;
        }
        /* where the op's tensors start within their buffers (past the common lead) */
        off[3 * i] = (in >= 0 && src->padded) ? (size_t)gi->first : 0;
        off[3 * i + 1] = (res >= 0 && (layouts & LAYOUT_RES_PADDED)) ? (size_t)go->first : 0;
        off[3 * i + 2] = want_out.padded ? (size_t)go->first : 0;
        if (want_out.padded && (size_t)go->lead > lead) lead = (size_t)go->lead;
        const int N = want_out.C;
        if (out >= 0) {
            const size_t len = want_out.padded
                ? (size_t)N * go->PS + (size_t)go->slack
                : (size_t)N * Ho * Wo + VL;
            if (len > buf_len[out]) buf_len[out] = len;
            cur[out] = want_out;
        } else {
            ylen = (size_t)N * Ho * Wo;
        }
        copy_at[i + 1] = copy_at[i] + (a ? plan_buffer_len(&pl[i]) : 0);
    }
    /* Fewer images than threads (team; batch 1, say): every thread on every image, each
     * op's filter blocks (a shortcut's channels) split between them, a barrier after each op,
     * the buffers shared.  Else each thread takes whole images with buffers of its own
     * (measured on ResNet-56 P4 with 2 threads: batch 2 in 1.5 ms that way, 2.1 ms as a team;
     * batch 1 as a team 1.4 ms, layer by layer 2.1 ms). */
    const int team = B < nthreads;
    size_t bufs_len = 0;
    for (int k = 0; k < nbuf && !status; ++k) bufs_len += lead + buf_len[k];
    const size_t per_thread = (status ? 0 : copy_at[nops]) + (team ? 0 : bufs_len);
    float *shared = NULL;
    if (team && !status && !(shared = (float *)calloc(bufs_len ? bufs_len : 1, sizeof(float))))
        status = -2;
    const chain_io io = {x, x2, y, (size_t)xs.C * xs.H * xs.W, (size_t)xs2.C * xs2.H * xs2.W,
                         ylen};
#pragma omp parallel num_threads(nthreads) if ((B > 1 && !status) || team)
    {
        /* this thread's memory: the ops' padded copies, then (not team) the buffers, each
         * after its lead of zeros */
        float *mem = status ? NULL : (float *)calloc(per_thread ? per_thread : 1, sizeof(float));
        float *bufs[64];
        int tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        if (!status && !mem) {
#pragma omp atomic write
            status = -2;
        }
        if (mem) {
            float *p = team ? shared : mem + copy_at[nops];
            for (int k = 0; k < nbuf; ++k) { bufs[k] = p + lead; p += lead + buf_len[k]; }
        }
        if (team) {
#pragma omp barrier
        }
        const int all = team && status == 0;  /* every thread saw the same status */
        if (all) {
            for (int b = 0; b < B; ++b)
                for (int i = 0; i < nops; ++i) {
                    const float *xb, *rb;
                    float *yb;
                    chain_ptrs(&io, &ops[i], off + 3 * i, bufs, b, &xb, &rb, &yb);
                    chain_run_op(&ops[i], &pl[i], stride_in + 4 * i, sgo[i], xb, rb, yb,
                                 mem + copy_at[i], tid, nt);
#pragma omp barrier
                }
        }
        /* whole images, one at a time to whichever thread is free (see hetconv_nhwc_forward) */
#pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < (team ? 0 : B); ++b) {
            if (!mem) continue;
            for (int i = 0; i < nops; ++i) {
                const float *xb, *rb;
                float *yb;
                chain_ptrs(&io, &ops[i], off + 3 * i, bufs, b, &xb, &rb, &yb);
                chain_run_op(&ops[i], &pl[i], stride_in + 4 * i, sgo[i], xb, rb, yb,
                             mem + copy_at[i], 0, 1);
            }
        }
        free(mem);
    }
    if (pl)
        for (int i = 0; i < nops; ++i) plan_free(&pl[i]);
    if (sgo)
        for (int i = 0; i < nops; ++i) geom_unref(sgo[i]);
    free(shared);
    free(cur); free(buf_len); free(pl); free(sgo); free(off); free(stride_in); free(copy_at);
    return status;
}

/*
 * Weight gradient.  For every filter n and every weight the pattern gives it:
 *   centre  gc[n, c]    = sum_{b, pixel} gy[b, n, pixel] * x[b, c, pixel]          (all M channels)
 *   taps    gt[n, j, t] = sum_{b, pixel} gy[b, n, pixel] * x[b, chan_j, pixel + tap_t]
 * (chan_j: the j-th channel of n's class).  Same geometry as the forward pass:
 * each image's x is copied into zero-padded planes and its gy into planes of
 * the computed positions (zero in the border columns), so a sum over computed
 * positions is the sum over real pixels.  Blocks of 4 filters of one class
 * (blk_cls: -1 = unused slot) x 4 weights accumulate in 16 registers over all
 * positions of an image; each thread sums its images into its own partial
 * gradient, and the partials are added at the end (fixed order: the result
 * does not depend on thread timing).
 * gc (N, M) and gt (N, Mk, T) are overwritten.  Returns 0 or a negative code.
 */
static void pad_grad(const float *gyb, float *buf, int N, const geom_t *g, int plane) {
    const int H = g->Ho, W = g->Wo;
    for (int n = 0; n < N; ++n) {
        const float *src = gyb + (size_t)n * H * W;
        float *dst = buf + (size_t)n * plane;
        for (int r = 0; r < H; ++r, src += W, dst += g->Wp) memcpy(dst, src, sizeof(float) * (size_t)W);
    }
}

/* Images whose positions one weight-gradient accumulation runs over: enough for about
 * WG_CHUNKS chunks, so the horizontal sums at its end stay a small part of the work. */
#define WG_CHUNKS 64
#define WG_MAX 16

#define WE 6  /* weights (entries) per weight-gradient block */

#if defined(__AVX512F__)
/* out[i][e] = sum over the ng images' chunks of gy_i * x_e; 4 filters x ne (<= WE) entries
 * in 24 registers: per chunk 4 + WE loads feed 4 * WE FMAs. */
static inline void wgrad_block(const float *const gyp[NB], size_t gstride, const float *x0,
                               size_t xstride, int ng, const int *off, int ne, int nchunk,
                               float out[NB][WE]) {
    __m512 acc[NB][WE];
    for (int i = 0; i < NB; ++i)
        for (int e = 0; e < WE; ++e) acc[i][e] = _mm512_setzero_ps();
    int o[WE];
    for (int e = 0; e < WE; ++e) o[e] = off[e < ne ? e : 0];
    for (int img = 0; img < ng; ++img) {
        const float *xi = x0 + (size_t)img * xstride;
        const float *gp0 = gyp[0] + img * gstride, *gp1 = gyp[1] + img * gstride;
        const float *gp2 = gyp[2] + img * gstride, *gp3 = gyp[3] + img * gstride;
        for (int q = 0; q < nchunk; ++q) {
            const int p = q * VL;
            const __m512 g0 = _mm512_loadu_ps(gp0 + p), g1 = _mm512_loadu_ps(gp1 + p);
            const __m512 g2 = _mm512_loadu_ps(gp2 + p), g3 = _mm512_loadu_ps(gp3 + p);
#pragma GCC unroll 6
            for (int e = 0; e < WE; ++e) {
                const __m512 xv = _mm512_loadu_ps(xi + o[e] + p);
                acc[0][e] = _mm512_fmadd_ps(g0, xv, acc[0][e]);
                acc[1][e] = _mm512_fmadd_ps(g1, xv, acc[1][e]);
                acc[2][e] = _mm512_fmadd_ps(g2, xv, acc[2][e]);
                acc[3][e] = _mm512_fmadd_ps(g3, xv, acc[3][e]);
            }
        }
    }
    for (int i = 0; i < NB; ++i)
        for (int e = 0; e < ne; ++e) out[i][e] = _mm512_reduce_add_ps(acc[i][e]);
}
#else
static void wgrad_block(const float *const gyp[NB], size_t gstride, const float *x0,
                        size_t xstride, int ng, const int *off, int ne, int nchunk,
                        float out[NB][WE]) {
    for (int i = 0; i < NB; ++i)
        for (int e = 0; e < ne; ++e) {
            float s = 0.f;
            for (int img = 0; img < ng; ++img)
                for (int p = 0; p < nchunk * VL; ++p)
                    s += gyp[i][img * gstride + p] * x0[img * xstride + off[e] + p];
            out[i][e] = s;
        }
}
#endif

int hetconv_native_wgrad(const float *x, const float *gy, float *gc, float *gt,
                         int B, int M, int N, int H, int W, int nblk, const int *blk_cls,
                         const int *blk_out, int P, int Mk, const int *chan, int T,
                         const int *tap_dh, const int *tap_dw, int stride, int kh, int kw,
                         int nthreads) {
    geom_t g;
    int *pe, *te;
    const int rc = kernel_setup(&g, &pe, &te, B, M, N, H, W, nblk, P, Mk, chan, T, tap_dh,
                                tap_dw, stride, kh, kw);
    if (rc) return rc;
    const int HWo = g.Ho * g.Wo;
    const int nte = Mk * T;
    const size_t per = (size_t)N * M + (size_t)N * nte;  /* one partial gradient */
    if (nthreads < 1) nthreads = 1;
    float *partial = (float *)calloc(per * (size_t)nthreads, sizeof(float));
    if (!partial) { free(pe); free(te); return -2; }
    const int gplane = g.nchunk * VL;  /* gy planes hold whole chunks (tail zero) */
    const size_t lead = (size_t)g.lead, slack = (size_t)g.slack;
    const size_t ximg = (size_t)M * g.PS + slack, gimg = (size_t)N * gplane;
    int WG = (WG_CHUNKS + g.nchunk - 1) / g.nchunk;
    if (WG > WG_MAX) WG = WG_MAX;
    if (WG > B) WG = B > 0 ? B : 1;
    const size_t xlen = lead + WG * ximg, glen = WG * gimg + VL;
    /* image groups: WG consecutive images; group k always goes to the same thread (static
     * schedule), so the partials add in a fixed order */
    const int ngroups = (B + WG - 1) / WG;
    if (nthreads > ngroups) nthreads = ngroups > 0 ? ngroups : 1;
    int status = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *xbuf = (float *)calloc(xlen, sizeof(float));
        float *gbuf = (float *)calloc(glen, sizeof(float));
        float *mine = partial + per * (size_t)tid;
        if (!xbuf || !gbuf) {
#pragma omp atomic write
            status = -2;
        }
#pragma omp for schedule(static)
        for (int grp = 0; grp < ngroups; ++grp) {
            if (!xbuf || !gbuf) continue;
            const int b0 = grp * WG, ng = B - b0 < WG ? B - b0 : WG;
            float *xp = xbuf + lead;
            for (int img = 0; img < ng; ++img) {
                pad_image(x + (size_t)(b0 + img) * M * H * W, xp + img * ximg, M, &g,
                          (size_t)H * W, W);
                pad_grad(gy + (size_t)(b0 + img) * N * HWo, gbuf + img * gimg, N, &g, gplane);
            }
            const float *x0 = xp + g.first;
            for (int blk = 0; blk < nblk; ++blk) {
                const int *bc = blk_cls + (size_t)blk * NB, *bo = blk_out + (size_t)blk * NB;
                const float *gyp[NB];
                for (int i = 0; i < NB; ++i)
                    gyp[i] = gbuf + (size_t)(bo[i] >= 0 ? bo[i] : bo[0]) * gplane;
                float out[NB][WE];
                for (int e0 = 0; e0 < M; e0 += WE) {
                    const int ne = M - e0 < WE ? M - e0 : WE;
                    wgrad_block(gyp, gimg, x0, ximg, ng, pe + e0, ne, g.nchunk, out);
                    for (int i = 0; i < NB; ++i)
                        if (bo[i] >= 0)
                            for (int e = 0; e < ne; ++e) mine[(size_t)bo[i] * M + e0 + e] += out[i][e];
                }
                if (bc[0] < 0 || nte == 0) continue;
                const int *tc = te + (size_t)bc[0] * nte;
                float *gtm = mine + (size_t)N * M;
                for (int e0 = 0; e0 < nte; e0 += WE) {
                    const int ne = nte - e0 < WE ? nte - e0 : WE;
                    wgrad_block(gyp, gimg, x0, ximg, ng, tc + e0, ne, g.nchunk, out);
                    for (int i = 0; i < NB; ++i)
                        if (bo[i] >= 0)
                            for (int e = 0; e < ne; ++e) gtm[(size_t)bo[i] * nte + e0 + e] += out[i][e];
                }
            }
        }
        free(xbuf); free(gbuf);
    }
    if (status == 0) {
        for (size_t k = 0; k < (size_t)N * M; ++k) {
            float s = 0.f;
            for (int t = 0; t < nthreads; ++t) s += partial[per * (size_t)t + k];
            gc[k] = s;
        }
        for (size_t k = 0; k < (size_t)N * nte; ++k) {
            float s = 0.f;
            for (int t = 0; t < nthreads; ++t) s += partial[per * (size_t)t + (size_t)N * M + k];
            gt[k] = s;
        }
    }
    free(partial); free(pe); free(te);
    return status;
}
