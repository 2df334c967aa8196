#!/usr/bin/env bash
# The kernel lab (examples/kernel_lab.rs): bash tools/kernel-lab.sh <op|all|list> [--device cuda|vgpu] [--dtype bf16|f32] [--shape ...] [--iters N]; see tools/README.md.
cd "$(dirname "$0")/.." || exit 2
if command -v cargo >/dev/null; then exec cargo run --release --example kernel_lab -- "$@"; else exec "${KERNEL_LAB:-target/release/examples/kernel_lab}" "$@"; fi
