//! Compiles the catch path's BPF program (`src/connect/catch/catch.bpf.c`) with clang into
//! `$OUT_DIR/catch.bpf.o`, which the daemon embeds. Without clang (or with
//! `DISCOTECH_NO_BPF=1`) the object is left empty and the daemon reports at start that this build
//! cannot catch connects; everything else works the same.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/connect/catch/catch.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=DISCOTECH_NO_BPF");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("catch.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let skip = std::env::var_os("DISCOTECH_NO_BPF").is_some_and(|v| v == "1");
    let arch_include = format!(
        "-I/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
    );
    let built = !skip
        && Command::new(&clang)
            .args([
                "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
            ])
            .arg(&arch_include)
            .args(["-c", src, "-o"])
            .arg(&out)
            .status()
            .is_ok_and(|s| s.success());
    if !built {
        if !skip {
            println!(
                "cargo:warning=cannot compile {src} with {clang} (install clang and libbpf-dev): this build cannot catch connects that bypass the hook"
            );
        }
        std::fs::write(&out, b"").expect("write the empty BPF object");
    }
}
