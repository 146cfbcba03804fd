/* Compiled CPU kernels of the geometry engine: batched eigen-decomposition of small symmetric
 * matrices, and CR's patch stage (one point's neighbourhood at a time) and pair stage (one
 * neighbour pair at a time), forward and backward.
 *
 * The tensor form (curvature/gram_rotation.py) spends most of its time launching a dozen small
 * batched operators over ~3,000 pairs and in LAPACK's per-matrix overhead; here each pair's whole
 * chain stays in a few hundred bytes of stack. For the edge (i, j), with A_j the (m x d) patch
 * coefficients of point j and S_i the (W x d) inner products of point i's cloud with T_i:
 *
 *     M   = A_j^T S_i[P_j]                   (d x d, M = T_j T_i^T)
 *     G   = diag(h_j) - M M^T                (eigenvalues: sin^2 of the principal angles)
 *     th  = sqrt(sum_l f(lambda_l)),  f(s) = asin(sqrt(s))^2
 *
 * and the backward pass, from d th:  d lambda_l = d th / (2 th) f'(lambda_l),
 * dG = V diag(d lambda) V^T,  dM = -2 dG M,  dA_j += S_i[P_j] dM^T,  dS_i[P_j] += A_j dM.
 * Eigenvalues come from cyclic Jacobi (Golub & Van Loan, 4th ed., Alg. 8.5.3, rotation as in
 * Numerical Recipes 11.1), which reaches full double precision on these tiny matrices. f, its
 * series near 0 and its cut-offs are those of curvature._linalg.squared_angle_from_sin2 and
 * safe_sqrt, with `eps` the machine epsilon of the angle dtype, so both forms give the same values
 * and gradients.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Loops over independent blocks run on OpenMP threads when the library is built with -fopenmp.
 * Loaded into a process that has imported PyTorch, it binds to PyTorch's own libgomp (same
 * SONAME), so it uses the thread team and the thread count (torch.set_num_threads) of PyTorch's
 * operators. Built without OpenMP, the same loops run serially. */
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#define TEAM_SIZE omp_get_num_threads()
#define MAX_THREADS omp_get_max_threads()
#else
#define THREAD_ID 0
#define TEAM_SIZE 1
#define MAX_THREADS 1
#endif

/* Work arrays live on the stack, sized by the sizes of the call (C99 variable-length arrays): about
 * 16 KB per thread for CR's 11 x 11 patches, up to ~200 KB at MAX_DIM, the largest size taken (larger
 * problems stay with the tensor form). */
#define MAX_DIM 32
#define MAX_SWEEPS 50
#define LANES 8
#define HALF_PI_SQ 2.4674011002723395 /* (pi / 2)^2 */

/* The Jacobi sweeps are built twice on x86-64 Linux, for AVX2 and for any CPU, and the dynamic
 * loader picks the one this CPU runs (an ifunc: 1.85 -> 1.39 ms for 448 11 x 11 matrices on the
 * 2-core VM). Elsewhere (no ifunc on macOS) they are built once, for any CPU of the platform. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

int curvlt_max_dim(void) { return MAX_DIM; }

/* Eigenvalues of LANES symmetric d x d matrices at once, `a[(p * d + q) * LANES + lane]` (destroyed),
 * into `lam[l * LANES + lane]`; eigenvectors as the columns of `vecs` (same layout as `a`) when it is
 * not NULL. The lanes run the same rotations side by side (a rotation that is not needed is the
 * identity), so that the compiler turns each step into vector instructions and the long latency of
 * each rotation's divisions and square roots is spread over LANES independent matrices. */
VECTOR_CLONES static void jacobi(int d, double *a, double *lam, double *vecs) {
#define AT(m, r, c) ((m) + ((r) * d + (c)) * LANES)
    if (vecs) {
        memset(vecs, 0, sizeof(double) * d * d * LANES);
        for (int i = 0; i < d; ++i)
            for (int lane = 0; lane < LANES; ++lane) AT(vecs, i, i)[lane] = 1.0;
    }
    for (int sweep = 0; sweep < MAX_SWEEPS; ++sweep) {
        int unconverged = 0;
        for (int lane = 0; lane < LANES; ++lane) {
            double off = 0.0, diag = 0.0;
            for (int p = 0; p < d; ++p) {
                diag += AT(a, p, p)[lane] * AT(a, p, p)[lane];
                for (int q = p + 1; q < d; ++q) off += AT(a, p, q)[lane] * AT(a, p, q)[lane];
            }
            unconverged += off > 1e-32 * diag; /* false on a zero matrix and on NaN */
        }
        if (!unconverged) break;
        for (int p = 0; p < d - 1; ++p) {
            for (int q = p + 1; q < d; ++q) {
                double c[LANES], s[LANES], t[LANES];
                double *app = AT(a, p, p), *aqq = AT(a, q, q), *apq = AT(a, p, q), *aqp = AT(a, q, p);
#pragma omp simd
                for (int lane = 0; lane < LANES; ++lane) {
                    double theta = (aqq[lane] - app[lane]) / (2.0 * apq[lane]);
                    double tan = copysign(1.0, theta) / (fabs(theta) + sqrt(theta * theta + 1.0));
                    t[lane] = apq[lane] == 0.0 ? 0.0 : tan;
                    c[lane] = 1.0 / sqrt(t[lane] * t[lane] + 1.0);
                    s[lane] = t[lane] * c[lane];
                }
                for (int r = 0; r < d; ++r) {
                    if (r == p || r == q) continue;
                    double *arp = AT(a, r, p), *arq = AT(a, r, q), *apr = AT(a, p, r), *aqr = AT(a, q, r);
#pragma omp simd
                    for (int lane = 0; lane < LANES; ++lane) {
                        double x = arp[lane], y = arq[lane];
                        arp[lane] = apr[lane] = c[lane] * x - s[lane] * y;
                        arq[lane] = aqr[lane] = s[lane] * x + c[lane] * y;
                    }
                }
#pragma omp simd
                for (int lane = 0; lane < LANES; ++lane) {
                    app[lane] -= t[lane] * apq[lane];
                    aqq[lane] += t[lane] * apq[lane];
                    apq[lane] = aqp[lane] = 0.0;
                }
                if (!vecs) continue;
                for (int r = 0; r < d; ++r) {
                    double *vrp = AT(vecs, r, p), *vrq = AT(vecs, r, q);
#pragma omp simd
                    for (int lane = 0; lane < LANES; ++lane) {
                        double x = vrp[lane], y = vrq[lane];
                        vrp[lane] = c[lane] * x - s[lane] * y;
                        vrq[lane] = s[lane] * x + c[lane] * y;
                    }
                }
            }
        }
    }
    for (int i = 0; i < d; ++i)
        for (int lane = 0; lane < LANES; ++lane) lam[i * LANES + lane] = AT(a, i, i)[lane];
#undef AT
}

/* f(s) = asin(sqrt(s))^2 of a clamped sin^2, and its slope in `slope` (0 where clamped or cut). */
static double squared_angle(double s, double eps, double *slope) {
    double inside = (s >= 0.0 && s <= 1.0) ? 1.0 : 0.0;
    s = s < 0.0 ? 0.0 : (s > 1.0 ? 1.0 : s);
    if (s < 1e-4) {
        *slope = inside * (1.0 + 2.0 * s / 3.0 + 8.0 * s * s / 15.0);
        return s * (1.0 + s / 3.0 + 8.0 * s * s / 45.0);
    }
    if (s > 1.0 - 4.0 * eps) {
        *slope = 0.0;
        return HALF_PI_SQ;
    }
    double root = sqrt(s), angle = asin(root);
    *slope = inside * angle / (root * sqrt(1.0 - s));
    return angle * angle;
}

/* M = A_j^T S_i[P_j] (d x d) of one edge, and G = diag(h_j) - M M^T into lane `lane` of `g`. */
static void edge_matrices(int d, int m, const double *coef_j, const double *inner_i, const int64_t *slots_j,
                          const double *has_j, double *M, double *g, int lane) {
    memset(M, 0, sizeof(double) * d * d);
    for (int a = 0; a < m; ++a) {
        const double *row = inner_i + slots_j[a] * d, *cj = coef_j + a * d;
        for (int l1 = 0; l1 < d; ++l1)
            for (int l2 = 0; l2 < d; ++l2) M[l1 * d + l2] += cj[l1] * row[l2];
    }
    for (int l1 = 0; l1 < d; ++l1) {
        for (int l2 = l1; l2 < d; ++l2) {
            double dot = 0.0;
            for (int t = 0; t < d; ++t) dot += M[l1 * d + t] * M[l2 * d + t];
            g[(l1 * d + l2) * LANES + lane] = g[(l2 * d + l1) * LANES + lane] = (l1 == l2 ? has_j[l1] : 0.0) - dot;
        }
    }
}

/* The spectra of G for edges first .. first + LANES - 1 (lanes past `edges` hold a zero matrix);
 * each edge's M into `M + lane * d * d`. */
static void block_spectra(int64_t first, int64_t edges, int d, int m, int64_t width, const double *coef,
                          const double *inner, const int64_t *slots, const double *has, const int64_t *own,
                          const int64_t *other, double *M, double *lam, double *vecs) {
    double g[d * d * LANES];
    memset(g, 0, sizeof(double) * d * d * LANES);
    for (int lane = 0; lane < LANES && first + lane < edges; ++lane) {
        int64_t i = own[first + lane], j = other[first + lane];
        edge_matrices(d, m, coef + j * m * d, inner + i * width * d, slots + j * m, has + j * d, M + lane * d * d,
                      g, lane);
    }
    jacobi(d, g, lam, vecs);
}

/* theta (E,) of the edges (own[e], other[e]). coef (n, m, d), inner (n, width, d), slots (n, m),
 * has (n, d) of 0/1, all contiguous. With `saved` (E, 2 d^2 + d) not NULL, also keeps for the
 * backward pass each edge's M, the eigenvectors V of G and d theta / d lambda. */
VECTOR_CLONES void curvlt_pair_forward(int64_t edges, int d, int m, int64_t width, const double *coef,
                                       const double *inner, const int64_t *slots, const double *has,
                                       const int64_t *own, const int64_t *other, double eps, double *theta,
                                       double *saved) {
    int64_t stride = 2 * d * d + d;
#pragma omp parallel for schedule(static) if (edges > 4 * LANES)
    for (int64_t first = 0; first < edges; first += LANES) {
        double M[d * d * LANES], V[d * d * LANES], lam[d * LANES], slope[d];
        block_spectra(first, edges, d, m, width, coef, inner, slots, has, own, other, M, lam, saved ? V : NULL);
        for (int lane = 0; lane < LANES && first + lane < edges; ++lane) {
            double total = 0.0;
            for (int l = 0; l < d; ++l) total += squared_angle(lam[l * LANES + lane], eps, &slope[l]);
            int cut = !(total > eps * eps); /* safe_sqrt: 0, with gradient 0 */
            theta[first + lane] = cut ? 0.0 : sqrt(total);
            if (!saved) continue;
            double *keep = saved + (first + lane) * stride;
            memcpy(keep, M + lane * d * d, sizeof(double) * d * d);
            for (int e = 0; e < d * d; ++e) keep[d * d + e] = V[e * LANES + lane];
            for (int l = 0; l < d; ++l) keep[2 * d * d + l] = cut ? 0.0 : slope[l] / (2.0 * theta[first + lane]);
        }
    }
}

/* Edge e's part of curvlt_pair_backward, added to grad_coef and grad_inner. */
static void pair_edge_backward(int64_t e, int d, int m, int64_t width, const double *coef, const double *inner,
                               const int64_t *slots, const int64_t *own, const int64_t *other, const double *saved,
                               const double *grad_theta, double *grad_coef, double *grad_inner) {
    double dG[d * d], dM[d * d], dlam[d];
    const double *M = saved + e * (2 * d * d + d), *V = M + d * d, *dtheta = V + d * d;
    int any = 0;
    for (int l = 0; l < d; ++l) any |= (dlam[l] = grad_theta[e] * dtheta[l]) != 0.0;
    if (!any) return;
    /* dG = V diag(dlam) V^T; dM = -2 dG M. */
    for (int r = 0; r < d; ++r) {
        for (int c = r; c < d; ++c) {
            double sum = 0.0;
            for (int l = 0; l < d; ++l) sum += V[r * d + l] * dlam[l] * V[c * d + l];
            dG[r * d + c] = dG[c * d + r] = sum;
        }
    }
    for (int r = 0; r < d; ++r) {
        for (int c = 0; c < d; ++c) {
            double sum = 0.0;
            for (int t = 0; t < d; ++t) sum += dG[r * d + t] * M[t * d + c];
            dM[r * d + c] = -2.0 * sum;
        }
    }
    int64_t i = own[e], j = other[e];
    const double *coef_j = coef + j * m * d, *inner_i = inner + i * width * d;
    const int64_t *slots_j = slots + j * m;
    double *gcoef_j = grad_coef + j * m * d, *ginner_i = grad_inner + i * width * d;
    for (int a = 0; a < m; ++a) {
        const double *row = inner_i + slots_j[a] * d, *cj = coef_j + a * d;
        double *grow = ginner_i + slots_j[a] * d, *gcj = gcoef_j + a * d;
        for (int l1 = 0; l1 < d; ++l1) {
            double sum = 0.0;
            for (int l2 = 0; l2 < d; ++l2) {
                sum += dM[l1 * d + l2] * row[l2];
                grow[l2] += cj[l1] * dM[l1 * d + l2];
            }
            gcj[l1] += sum;
        }
    }
}

/* Splits items 0 .. count - 1 into `parts` ranges [start[t], start[t + 1]) of about equal length,
 * each bound moved forward to where `key` changes, so that all items of one key fall in one range;
 * returns 0 (and splits nothing) unless `key` is non-decreasing. A thread that takes one range is
 * then the only one to write what belongs to its keys, and needs no copy of its own to add into. */
static int split_by_key(int64_t count, const int64_t *key, int parts, int64_t *start) {
    for (int64_t item = 1; item < count; ++item)
        if (key[item] < key[item - 1]) return 0;
    start[0] = 0;
    for (int t = 1; t < parts; ++t) {
        int64_t bound = count * t / parts;
        while (bound > 0 && bound < count && key[bound] == key[bound - 1]) ++bound;
        start[t] = bound > start[t - 1] ? bound : start[t - 1];
    }
    start[parts] = count;
    return 1;
}

/* Adds the gradients of sum_e grad_theta[e] * theta[e] to grad_coef (n, m, d) and grad_inner
 * (n, width, d), from what curvlt_pair_forward kept in `saved`. Edge (i, j) adds to grad_inner of
 * point i = own[e] alone, and own[] is non-decreasing (curvlt_undirected_edges lists the edges point
 * by point), so each thread takes the edges of a run of points and adds into grad_inner directly.
 * Its additions to grad_coef of j = other[e] go to a copy per thread (n m d doubles, W / m times
 * fewer than grad_inner), summed at the end. Edges in another order run on one thread. */
VECTOR_CLONES void curvlt_pair_backward(int64_t edges, int64_t n, int d, int m, int64_t width, const double *coef,
                                        const double *inner, const int64_t *slots, const int64_t *own,
                                        const int64_t *other, const double *saved, const double *grad_theta,
                                        double *grad_coef, double *grad_inner) {
    int64_t coef_size = n * m * d;
    int threads = edges > 4 * LANES ? MAX_THREADS : 1;
    int64_t start[threads + 1];
    double *extra = NULL;
    if (threads > 1 && split_by_key(edges, own, threads, start))
        extra = calloc((size_t)(threads - 1) * (size_t)coef_size, sizeof(double));
    if (!extra) { /* one thread: the edges were not in point order, or memory is short */
        threads = 1;
        start[0] = 0;
        start[1] = edges;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    for (int t = THREAD_ID; t < threads; t += TEAM_SIZE) { /* range t, and its copy, by one thread */
        double *gc = t == 0 ? grad_coef : extra + (t - 1) * coef_size;
        for (int64_t e = start[t]; e < start[t + 1]; ++e)
            pair_edge_backward(e, d, m, width, coef, inner, slots, own, other, saved, grad_theta, gc, grad_inner);
    }
    if (!extra) return;
    for (int t = 1; t < threads; ++t) {
        const double *part = extra + (t - 1) * coef_size;
        for (int64_t idx = 0; idx < coef_size; ++idx) grad_coef[idx] += part[idx];
    }
    free(extra);
}

/* Lane `lane`'s eigenvalues and eigenvectors (columns) of a decomposed block, sorted (ascending, or
 * descending with `descending`) into lam (d,) and vecs (d, d). */
static void sorted_lane(int d, int lane, const double *wl, const double *wv, int descending, double *lam,
                        double *vecs) {
    int order[d];
    for (int i = 0; i < d; ++i) order[i] = i;
    for (int i = 1; i < d; ++i) /* insertion sort */
        for (int j = i; j > 0; --j) {
            double here = wl[order[j] * LANES + lane], before = wl[order[j - 1] * LANES + lane];
            if (descending ? here <= before : here >= before) break;
            int swap = order[j]; order[j] = order[j - 1]; order[j - 1] = swap;
        }
    for (int i = 0; i < d; ++i) {
        lam[i] = wl[order[i] * LANES + lane];
        for (int r = 0; r < d; ++r) vecs[r * d + i] = wv[(r * d + order[i]) * LANES + lane];
    }
}

/* Eigenvalues (ascending, or descending with `descending`) into lam (n, d) and eigenvectors as
 * columns into vecs (n, d, d) of the symmetric matrices a (n, d, d), all contiguous. `a` may be
 * `vecs`: each block of LANES matrices is read before its vectors are written. */
static void eigh_blocks(int64_t n, int d, const double *a, int descending, double *lam, double *vecs) {
#pragma omp parallel for schedule(static) if (n > 4 * LANES)
    for (int64_t first = 0; first < n; first += LANES) {
        double work[d * d * LANES], wl[d * LANES], wv[d * d * LANES];
        int lanes = n - first < LANES ? (int)(n - first) : LANES;
        memset(work, 0, sizeof(double) * d * d * LANES);
        for (int lane = 0; lane < lanes; ++lane)
            for (int e = 0; e < d * d; ++e) work[e * LANES + lane] = a[(first + lane) * d * d + e];
        jacobi(d, work, wl, wv);
        for (int lane = 0; lane < lanes; ++lane)
            sorted_lane(d, lane, wl, wv, descending, lam + (first + lane) * d, vecs + (first + lane) * d * d);
    }
}

/* Eigenvalues (ascending) into lam (n, d) and eigenvectors as columns into vecs (n, d, d) of the
 * symmetric matrices a (n, d, d), all contiguous. */
void curvlt_eigh(int64_t n, int d, const double *a, double *lam, double *vecs) {
    eigh_blocks(n, d, a, 0, lam, vecs);
}

/* H X H of a symmetric m x m matrix, in place (H = I - 11^T / m): row and column means are equal. */
static void centre(int m, double *x) {
    double mean[m], total = 0.0;
    for (int a = 0; a < m; ++a) {
        double sum = 0.0;
        for (int b = 0; b < m; ++b) sum += x[a * m + b];
        mean[a] = sum / m;
        total += sum;
    }
    total /= (double)m * m;
    for (int a = 0; a < m; ++a)
        for (int b = 0; b < m; ++b) x[a * m + b] += total - mean[a] - mean[b];
}

/* ---- CR's patch stage (curvature/gram_rotation.py, kernel form) ----
 * Point r's patch P = slots[r, :m] lies in cloud block[r], whose Gram matrix is
 * K = grams + block[r] * W * W. Its centred Gram matrix C = H K[P, P] H = U diag(lambda) U^T
 * (descending), the scales s_l = lambda_l^(-1/2) of the top d directions that have variance
 * (lambda_l > 100 eps lambda_0 and > 0, else s_l = 0), the coefficients A = H U[:, :d] diag(s) and
 * the inner products S = K[:, P] A of the whole cloud with T_r's directions. */

/* Descending eigenvalues (n, m) and eigenvectors (n, m, m) of every patch's C, which is first
 * formed in `evecs`. */
void curvlt_patch_spectra(int64_t n, int m, int64_t width, const double *grams, const int64_t *block,
                          const int64_t *slots, double *evals, double *evecs) {
#pragma omp parallel for schedule(static) if (n > 4 * LANES)
    for (int64_t r = 0; r < n; ++r) {
        const double *K = grams + block[r] * width * width;
        const int64_t *P = slots + r * m;
        double *C = evecs + r * m * m;
        for (int a = 0; a < m; ++a)
            for (int b = 0; b < m; ++b) C[a * m + b] = K[P[a] * width + P[b]];
        centre(m, C);
    }
    eigh_blocks(n, m, evecs, 1, evals, evecs);
}

/* The top-d scales s (d,) of one patch's descending eigenvalues, 0 for directions without variance. */
static void tangent_scales(int d, const double *lam, double *scale) {
    double floor = lam[0] * 100.0 * 2.220446049250313e-16;
    for (int l = 0; l < d; ++l) scale[l] = (lam[l] > floor && lam[l] > 0.0) ? 1.0 / sqrt(lam[l]) : 0.0;
}

/* A (n, m, d), S (n, width, d) and has (n, d) (1 where the direction has variance) of every patch. */
VECTOR_CLONES void curvlt_patch_forward(int64_t n, int m, int d, int64_t width, const double *grams,
                                        const int64_t *block, const int64_t *slots, const double *evals,
                                        const double *evecs, double *coef, double *inner, double *has) {
#pragma omp parallel for schedule(static) if (n > 32)
    for (int64_t r = 0; r < n; ++r) {
        double scale[d];
        const double *K = grams + block[r] * width * width, *U = evecs + r * m * m;
        const int64_t *P = slots + r * m;
        double *A = coef + r * m * d, *S = inner + r * width * d;
        tangent_scales(d, evals + r * m, scale);
        for (int l = 0; l < d; ++l) {
            double mean = 0.0;
            for (int a = 0; a < m; ++a) mean += U[a * m + l];
            mean /= m;
            for (int a = 0; a < m; ++a) A[a * d + l] = (U[a * m + l] - mean) * scale[l];
            has[r * d + l] = scale[l] > 0.0 ? 1.0 : 0.0;
        }
        memset(S, 0, sizeof(double) * width * d);
        for (int a = 0; a < m; ++a) {
            const double *row = K + P[a] * width; /* K[P_a, :] = K[:, P_a] */
            for (int w = 0; w < width; ++w)
                for (int l = 0; l < d; ++l) S[w * d + l] += row[w] * A[a * d + l];
        }
    }
}

/* Point r's part of curvlt_patch_backward, added to grad_grams. */
static void patch_point_backward(int64_t r, int m, int d, int64_t width, const double *grams, const int64_t *block,
                                 const int64_t *slots, const double *evals, const double *evecs, const double *coef,
                                 const double *grad_coef, const double *grad_inner, double *grad_grams) {
    const double eps = 2.220446049250313e-16;
    double scale[d], dA[m * d], dlam[m], inner[m * d], half[m * d], dC[m * m];
    const double *K = grams + block[r] * width * width, *U = evecs + r * m * m, *lam = evals + r * m;
    const double *A = coef + r * m * d, *dS = grad_inner + r * width * d;
    const int64_t *P = slots + r * m;
    double *dK = grad_grams + block[r] * width * width;
    /* S = K[P, :]^T A: dA = grad_coef + K[P, :] dS, dK[P_a, w] += sum_l A[a, l] dS[w, l]. */
    for (int a = 0; a < m; ++a) {
        const double *row = K + P[a] * width;
        double *grow = dK + P[a] * width;
        for (int l = 0; l < d; ++l) dA[a * d + l] = grad_coef[r * m * d + a * d + l];
        for (int w = 0; w < width; ++w) {
            double sum = 0.0;
            for (int l = 0; l < d; ++l) {
                dA[a * d + l] += row[w] * dS[w * d + l];
                sum += A[a * d + l] * dS[w * d + l];
            }
            grow[w] += sum;
        }
    }
    /* A = H B, B = U[:, :d] diag(s): dB = H dA; dU = dB diag(s); ds_l = sum_a dB[a, l] U[a, l]. */
    tangent_scales(d, lam, scale);
    for (int l = 0; l < m; ++l) dlam[l] = 0.0;
    for (int l = 0; l < d; ++l) {
        double column_mean = 0.0, ds = 0.0;
        for (int a = 0; a < m; ++a) column_mean += dA[a * d + l];
        column_mean /= m;
        for (int a = 0; a < m; ++a) {
            double dB = dA[a * d + l] - column_mean;
            ds += dB * U[a * m + l];
            dA[a * d + l] = dB * scale[l]; /* now dU[:, l] */
        }
        if (scale[l] > 0.0) dlam[l] = -0.5 * ds * scale[l] * scale[l] * scale[l];
    }
    /* inner = F o (U^T dU) + diag(d lambda): only its first d columns are not zero (dU and
     * d lambda are zero beyond d), so U inner U^T = (U inner[:, :d]) U[:, :d]^T. */
    double magnitude = 0.0;
    for (int l = 0; l < m; ++l) magnitude = fmax(magnitude, fabs(lam[l]));
    if (!(magnitude > 0.0)) return; /* a patch of identical points: nothing to move */
    double gap_floor = 100.0 * eps * magnitude;
    for (int i = 0; i < m; ++i) {
        for (int j = 0; j < d; ++j) {
            if (i == j) {
                inner[i * d + j] = dlam[i];
                continue;
            }
            double dot = 0.0;
            for (int a = 0; a < m; ++a) dot += U[a * m + i] * dA[a * d + j];
            double gap = lam[j] - lam[i];
            if (fabs(gap) < gap_floor) gap = gap >= 0.0 ? gap_floor : -gap_floor;
            inner[i * d + j] = dot / gap;
        }
    }
    /* dC = sym(half U[:, :d]^T), half = U inner[:, :d] (m x d). */
    for (int a = 0; a < m; ++a)
        for (int j = 0; j < d; ++j) {
            double sum = 0.0;
            for (int i = 0; i < m; ++i) sum += U[a * m + i] * inner[i * d + j];
            half[a * d + j] = sum;
        }
    for (int a = 0; a < m; ++a)
        for (int b = a; b < m; ++b) {
            double sum = 0.0;
            for (int j = 0; j < d; ++j) sum += half[a * d + j] * U[b * m + j] + half[b * d + j] * U[a * m + j];
            dC[a * m + b] = dC[b * m + a] = 0.5 * sum;
        }
    /* C = H K[P, P] H: dK[P_a, P_b] += (H dC H)[a, b]. */
    centre(m, dC);
    for (int a = 0; a < m; ++a)
        for (int b = 0; b < m; ++b) dK[P[a] * width + P[b]] += dC[a * m + b];
}

/* Adds to grad_grams (B, width, width) the gradient of <grad_coef, A> + <grad_inner, S> through
 * S = K[:, P] A, A = H U[:, :d] diag(s(lambda)) and the eigen-decomposition of C = H K[P, P] H, whose
 * backward is curvature._linalg._SymmetricEigh's: dC = V (F o V^T dV + diag(d lambda)) V^T,
 * symmetrised, F_ij = 1 / (lambda_j - lambda_i) with gaps clamped at 100 eps max|lambda|. A point adds
 * into its own cloud's Gram matrix alone, and the points come cloud by cloud, so each thread takes
 * the points of a run of clouds and adds directly (points in another order run on one thread). */
VECTOR_CLONES void curvlt_patch_backward(int64_t n, int m, int d, int64_t width, const double *grams,
                                         const int64_t *block, const int64_t *slots, const double *evals,
                                         const double *evecs, const double *coef, const double *grad_coef,
                                         const double *grad_inner, double *grad_grams) {
    int threads = n > 32 ? MAX_THREADS : 1;
    int64_t start[threads + 1];
    if (!(threads > 1 && split_by_key(n, block, threads, start))) {
        threads = 1;
        start[0] = 0;
        start[1] = n;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    for (int t = THREAD_ID; t < threads; t += TEAM_SIZE) /* a team smaller than asked takes several ranges */
        for (int64_t r = start[t]; r < start[t + 1]; ++r)
            patch_point_backward(r, m, d, width, grams, block, slots, evals, evecs, coef, grad_coef, grad_inner,
                                 grad_grams);
}

/* Each neighbour pair once, as curvature.gram_rotation._undirected_edges gives them (in another
 * order): the edge (i, j) of indices (n, k) is the pair of (j, i) when both points have all their
 * directions (`symmetric`) and j lists i. Fills own / other of the distinct edges (at most n k) and
 * which (n k), the distinct edge of each directed one; returns how many are distinct. */
int64_t curvlt_undirected_edges(int64_t n, int k, const int64_t *indices, const uint8_t *symmetric, int64_t *own,
                                int64_t *other, int64_t *which) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
        for (int a = 0; a < k; ++a) {
            int64_t edge = i * k + a, j = indices[edge], twin = -1;
            if (j < i && symmetric[i] && symmetric[j])
                for (int b = 0; b < k && twin < 0; ++b)
                    if (indices[j * k + b] == i) twin = j * k + b;
            if (twin >= 0) {
                which[edge] = which[twin];
            } else {
                own[count] = i;
                other[count] = j;
                which[edge] = count++;
            }
        }
    }
    return count;
}
