//! `spin`: burns CPU forever; only fuel, a deadline or a kill ends it.

use std::hint::black_box;

fn main() {
    let mut counter: u64 = 0;
    loop {
        // black_box keeps the optimiser from proving the loop has no effect.
        counter = black_box(counter.wrapping_add(1));
    }
}
