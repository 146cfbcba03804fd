/* Compiled CPU kernels of the geometry engine: batched eigen-decomposition of small symmetric
 * matrices, and CR's pair stage, forward and backward, one neighbour pair at a time.
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
#include <string.h>

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
    double g[MAX_DIM * MAX_DIM * LANES];
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
void curvlt_pair_forward(int64_t edges, int d, int m, int64_t width, const double *coef, const double *inner,
                         const int64_t *slots, const double *has, const int64_t *own, const int64_t *other,
                         double eps, double *theta, double *saved) {
    double M[MAX_DIM * MAX_DIM * LANES], V[MAX_DIM * MAX_DIM * LANES], lam[MAX_DIM * LANES];
    double slope[MAX_DIM];
    int64_t stride = 2 * d * d + d;
    for (int64_t first = 0; first < edges; first += LANES) {
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

/* Adds the gradients of sum_e grad_theta[e] * theta[e] to grad_coef (n, m, d) and grad_inner
 * (n, width, d), from what curvlt_pair_forward kept in `saved`. */
void curvlt_pair_backward(int64_t edges, int d, int m, int64_t width, const double *coef, const double *inner,
                          const int64_t *slots, const int64_t *own, const int64_t *other, const double *saved,
                          const double *grad_theta, double *grad_coef, double *grad_inner) {
    double dG[MAX_DIM * MAX_DIM], dM[MAX_DIM * MAX_DIM], dlam[MAX_DIM];
    int64_t stride = 2 * d * d + d;
    for (int64_t e = 0; e < edges; ++e) {
        const double *M = saved + e * stride, *V = M + d * d, *dtheta = V + d * d;
        int any = 0;
        for (int l = 0; l < d; ++l) any |= (dlam[l] = grad_theta[e] * dtheta[l]) != 0.0;
        if (!any) continue;
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
}

/* Eigenvalues (ascending) into lam (n, d) and eigenvectors as columns into vecs (n, d, d) of the
 * symmetric matrices a (n, d, d), all contiguous. */
void curvlt_eigh(int64_t n, int d, const double *a, double *lam, double *vecs) {
    double work[MAX_DIM * MAX_DIM * LANES], wl[MAX_DIM * LANES], wv[MAX_DIM * MAX_DIM * LANES];
    for (int64_t first = 0; first < n; first += LANES) {
        int lanes = n - first < LANES ? (int)(n - first) : LANES;
        memset(work, 0, sizeof(double) * d * d * LANES);
        for (int lane = 0; lane < lanes; ++lane)
            for (int e = 0; e < d * d; ++e) work[e * LANES + lane] = a[(first + lane) * d * d + e];
        jacobi(d, work, wl, wv);
        for (int lane = 0; lane < lanes; ++lane) {
            int order[MAX_DIM];
            for (int i = 0; i < d; ++i) order[i] = i;
            for (int i = 1; i < d; ++i) /* insertion sort of the eigenvalues, ascending */
                for (int j = i; j > 0 && wl[order[j] * LANES + lane] < wl[order[j - 1] * LANES + lane]; --j) {
                    int swap = order[j]; order[j] = order[j - 1]; order[j - 1] = swap;
                }
            double *out_l = lam + (first + lane) * d, *out_v = vecs + (first + lane) * d * d;
            for (int i = 0; i < d; ++i) {
                out_l[i] = wl[order[i] * LANES + lane];
                for (int r = 0; r < d; ++r) out_v[r * d + i] = wv[(r * d + order[i]) * LANES + lane];
            }
        }
    }
}
