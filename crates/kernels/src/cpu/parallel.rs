//! Splitting row-wise work over the threads of the current rayon pool.

use std::cell::Cell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

thread_local! {
    /// Set while a kernel runs inside [`side_by_side`]: it keeps to its own thread.
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Threads a kernel may split its work over here: the current pool's, or 1 inside
/// [`side_by_side`].
pub(crate) fn threads() -> usize {
    if SERIAL.get() {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Runs two independent pieces of work at the same time, each on one thread of the pool (the
/// input and weight gradients of a linear layer: two products of about the same size keep two
/// cores busy without splitting either, and without waking a thread per split).
pub(crate) fn side_by_side<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    if threads() < 2 {
        return (a(), b());
    }
    rayon::join(|| serial(a), || serial(b))
}

/// `f` with [`threads`] = 1 on this thread.
fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _restore = Restore(SERIAL.replace(true));
    f()
}

/// Rows per task so that a task holds at least `MIN_WORK` elements and there are a few tasks per
/// thread (a row is never split).
fn rows_per_task(rows: usize, work: usize) -> usize {
    const MIN_WORK: usize = 16 * 1024;
    let threads = threads();
    if threads <= 1 {
        return rows.max(1);
    }
    let by_work = MIN_WORK.div_ceil(work.max(1));
    let by_threads = rows.div_ceil(4 * threads);
    by_work.max(by_threads).max(1)
}

/// Calls `f(first_row, rows_of_out)` on consecutive blocks of whole rows of `out`
/// (`row_len` elements each), in parallel when there is enough work.
pub(crate) fn for_rows<T: Send>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    for_rows_by(out, row_len, row_len, f)
}

/// [`for_rows`] where a row costs about `work` elements' worth (a row of one output value that
/// reads a whole vocabulary row, say), which decides the split.
fn for_rows_by<T: Send>(
    out: &mut [T],
    row_len: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let row_len = row_len.max(1);
    let rows = out.len() / row_len;
    let per = rows_per_task(rows, work);
    if per >= rows {
        f(0, out);
        return;
    }
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(i, chunk)| f(i * per, chunk));
}

/// Like [`for_rows`] over two outputs with the same number of rows, a row of both costing
/// about `work` elements' worth.
fn for_rows2<T: Send, U: Send>(
    a: &mut [T],
    a_len: usize,
    b: &mut [U],
    b_len: usize,
    work: usize,
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync + Send,
) {
    let (a_len, b_len) = (a_len.max(1), b_len.max(1));
    let rows = a.len() / a_len;
    let per = rows_per_task(rows, work);
    if per >= rows {
        f(0, a, b);
        return;
    }
    a.par_chunks_mut(per * a_len)
        .zip(b.par_chunks_mut(per * b_len))
        .enumerate()
        .for_each(|(i, (x, y))| f(i * per, x, y));
}

/// A new vector of `len` elements, written by `f(first_row, rows)` on blocks of whole rows as
/// [`for_rows`] (a row costing `work` elements' worth). Each block is set to `fill` on the
/// thread that then writes it, just before, while it is in cache: no serial zeroing pass over
/// the whole output first (what `vec![0.0; len]` costs).
pub(crate) fn new_rows<T: Copy + Send + Sync>(
    len: usize,
    row_len: usize,
    work: usize,
    fill: T,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    for_rows_by(
        &mut out.spare_capacity_mut()[..len],
        row_len,
        work,
        |first, rows| f(first, init(rows, fill)),
    );
    // SAFETY: the blocks cover all `len` elements and each was initialised (by `init`).
    unsafe { out.set_len(len) };
    out
}

/// Two new vectors with the same number of rows, as [`new_rows`].
pub(crate) fn new_rows2<T: Copy + Send + Sync, U: Copy + Send + Sync>(
    (a_len, a_row): (usize, usize),
    (b_len, b_row): (usize, usize),
    work: usize,
    (a_fill, b_fill): (T, U),
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync + Send,
) -> (Vec<T>, Vec<U>) {
    let (mut a, mut b) = (Vec::with_capacity(a_len), Vec::with_capacity(b_len));
    for_rows2(
        &mut a.spare_capacity_mut()[..a_len],
        a_row,
        &mut b.spare_capacity_mut()[..b_len],
        b_row,
        work,
        |first, x, y| f(first, init(x, a_fill), init(y, b_fill)),
    );
    // SAFETY: as in `new_rows`, for both (the blocks of `for_rows2` cover both outputs: the
    // callers give lengths of the same number of rows).
    unsafe {
        a.set_len(a_len);
        b.set_len(b_len);
    }
    (a, b)
}

/// `rows` set to `fill`, as initialised elements.
pub(crate) fn init<T: Copy>(rows: &mut [MaybeUninit<T>], fill: T) -> &mut [T] {
    rows.fill(MaybeUninit::new(fill));
    // SAFETY: every element was just written; `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(rows as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Sums per-block partial results `f(start, end)` over blocks of `block` rows, in block order, so
/// the result depends neither on the number of threads nor on scheduling (bit-reproducible
/// runs); with `block` = a batch row's positions, micro-batches and ranks that split the batch
/// along its rows sum the same per-row partials.
pub(crate) fn sum_blocks(
    rows: usize,
    block: usize,
    len: usize,
    f: impl Fn(usize, usize) -> Vec<f32> + Sync,
) -> Vec<f32> {
    let block = block.max(1);
    let blocks = rows.div_ceil(block);
    let partial: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|i| f(i * block, ((i + 1) * block).min(rows)))
        .collect();
    let mut total = vec![0.0f32; len];
    for p in partial {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}
