//! Compiles the BPF C programs with clang and generates their libbpf-rs skeletons.
use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

fn skeleton(name: &str) {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let src = format!("src/bpf/{name}.bpf.c");
    SkeletonBuilder::new()
        .source(&src)
        // v3: atomic fetch-and-add with its result (unwind object ids), Linux 5.12+.
        .clang_args(["-Wall", "-Wno-unused-function", "-O2", "-g", "-mcpu=v3"])
        .build_and_generate(out.join(format!("{name}.skel.rs")))
        .unwrap_or_else(|e| panic!("building {src}: {e:#}"));
    println!("cargo:rerun-if-changed={src}");
}

fn main() {
    skeleton("memleak");
    skeleton("kmem");
    println!("cargo:rerun-if-changed=src/bpf/memleak.h");
    println!("cargo:rerun-if-changed=src/bpf/kernel_types.h");
    println!("cargo:rerun-if-changed=src/bpf/unwind.bpf.h");
    println!("cargo:rerun-if-changed=src/bpf/records.bpf.h");
    println!("cargo:rerun-if-changed=src/bpf/ranges.bpf.h");
}
