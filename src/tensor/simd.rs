//! Elementwise kernels of the closed forms' per-sample loops, compiled twice: for the portable
//! baseline (x86-64's SSE2: two doubles per instruction) and for AVX2 + FMA, picked at run time.
//! faer's products already dispatch this way; these loops (scaled copies, sums of squares,
//! dot products over ~100 numbers, a few thousand times per sample) otherwise run at half the
//! width the CPU offers. Written by hand because the `std` feature detection is all it takes.

macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        #[inline]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

dispatch! {
    /// `y += alpha x`.
    fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
        for (o, v) in y.iter_mut().zip(x) {
            *o += alpha * v;
        }
    }
}

dispatch! {
    /// `y += a o b` (elementwise).
    fn add_product(y: &mut [f64], a: &[f64], b: &[f64]) {
        for ((o, u), v) in y.iter_mut().zip(a).zip(b) {
            *o += u * v;
        }
    }
}

dispatch! {
    /// `y += (a o b)^2` (elementwise).
    fn add_squared_product(y: &mut [f64], a: &[f64], b: &[f64]) {
        for ((o, u), v) in y.iter_mut().zip(a).zip(b) {
            let p = u * v;
            *o += p * p;
        }
    }
}

dispatch! {
    /// `y += a o a` (elementwise).
    fn add_square(y: &mut [f64], a: &[f64]) {
        for (o, u) in y.iter_mut().zip(a) {
            *o += u * u;
        }
    }
}

dispatch! {
    /// `y = a o b` (elementwise).
    fn product(y: &mut [f64], a: &[f64], b: &[f64]) {
        for ((o, u), v) in y.iter_mut().zip(a).zip(b) {
            *o = u * v;
        }
    }
}

dispatch! {
    /// `y = alpha x`.
    fn scaled_copy(y: &mut [f64], alpha: f64, x: &[f64]) {
        for (o, v) in y.iter_mut().zip(x) {
            *o = alpha * v;
        }
    }
}

dispatch! {
    /// `a . b`, in eight interleaved partial sums (so that the loop vectorises).
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        let mut acc = [0.0f64; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f64 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for k in 0..8 {
                acc[k] += x[k] * y[k];
            }
        }
        acc.iter().sum::<f64>() + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_plain_loops() {
        let n = 37;
        let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-14 * (1.0 + y.abs());
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(close(dot(&a, &b), plain));
        let mut y = b.clone();
        axpy(&mut y, 0.5, &a);
        let mut z = b.clone();
        add_product(&mut z, &a, &a);
        let mut s = b.clone();
        add_squared_product(&mut s, &a, &b);
        let mut q = b.clone();
        add_square(&mut q, &a);
        let mut c = vec![0.0; n];
        scaled_copy(&mut c, -2.0, &a);
        let mut p = vec![0.0; n];
        product(&mut p, &a, &b);
        for i in 0..n {
            assert!(close(y[i], b[i] + 0.5 * a[i]));
            assert!(close(z[i], b[i] + a[i] * a[i]));
            assert!(close(s[i], b[i] + (a[i] * b[i]).powi(2)));
            assert!(close(q[i], b[i] + a[i] * a[i]));
            assert!(close(c[i], -2.0 * a[i]));
            assert!(close(p[i], a[i] * b[i]));
        }
    }
}
