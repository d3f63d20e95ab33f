//! Build script: only with the `xen` feature. Links libxenlight and libxentoollog through
//! pkg-config and checks, by compiling a few C static assertions against the installed libxl.h,
//! that the hand-written FFI declarations in src/xen/ffi.rs still fit this libxl: the opaque
//! buffers are large and aligned enough, the one struct laid out in Rust
//! (`libxl_childproc_hooks`) has the expected layout, and the constants have their values.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "xen")]
    xen::main();
}

#[cfg(feature = "xen")]
mod xen {
    use std::io::Write;
    use std::process::{Command, Stdio};

    mod layout {
        include!("src/xen/layout.rs");
    }

    /// The oldest libxl whose API matches the declarations (ao_how on pause/unpause, the
    /// 4.13 create_restore with send_back_fd, libxl_retrieve_domain_configuration with ao_how).
    const MIN_XENLIGHT: &str = "4.14";

    pub fn main() {
        println!("cargo:rerun-if-changed=src/xen/layout.rs");
        println!("cargo:rerun-if-env-changed=CC");
        let xenlight = match pkg_config::Config::new()
            .atleast_version(MIN_XENLIGHT)
            .probe("xenlight")
        {
            Ok(lib) => lib,
            Err(e) => fail(&format!(
                "the `xen` feature needs libxenlight >= {MIN_XENLIGHT} with its pkg-config file \
                 (Debian: `apt-get install libxen-dev`): {e}"
            )),
        };
        if let Err(e) = pkg_config::Config::new().probe("xentoollog") {
            fail(&format!(
                "the `xen` feature needs libxentoollog (Debian: libxen-dev): {e}"
            ));
        }
        check_layout(&xenlight.include_paths);
    }

    fn fail(message: &str) -> ! {
        eprintln!("error: {message}");
        std::process::exit(1);
    }

    /// Compiles (syntax and semantics only, nothing is linked or run) a C file of static
    /// assertions against libxl.h.
    fn check_layout(includes: &[std::path::PathBuf]) {
        let source = format!(
            r#"
#include <stddef.h>
#include <stdint.h>
#include <libxl.h>
#include <libxl_utils.h>
#include <libxl_event.h>
#include <xentoollog.h>

#define FITS(T, N) \
    _Static_assert(sizeof(T) <= (N), #T " is larger than its buffer in src/xen/layout.rs"); \
    _Static_assert(_Alignof(T) <= {align}, #T " is more strictly aligned than its buffer")
FITS(libxl_dominfo, {dominfo});
FITS(libxl_domain_config, {config});
FITS(libxl_domain_restore_params, {restore});

_Static_assert(sizeof(libxl_childproc_hooks) == 3 * sizeof(void *), "libxl_childproc_hooks size");
_Static_assert(offsetof(libxl_childproc_hooks, chldowner) == 0, "chldowner offset");
_Static_assert(offsetof(libxl_childproc_hooks, fork_replacement) == sizeof(void *), "fork_replacement offset");
_Static_assert(offsetof(libxl_childproc_hooks, reaped_callback) == 2 * sizeof(void *), "reaped_callback offset");
_Static_assert(sizeof(libxl_sigchld_owner) == sizeof(int), "libxl_sigchld_owner is an int");
_Static_assert(libxl_sigchld_owner_mainloop == 1, "libxl_sigchld_owner_mainloop");

_Static_assert(LIBXL_VERSION == 0, "LIBXL_VERSION");
_Static_assert(LIBXL_SUSPEND_LIVE == 2, "LIBXL_SUSPEND_LIVE");
_Static_assert(ERROR_INVAL == -6, "ERROR_INVAL");
_Static_assert(ERROR_DOMAIN_NOTFOUND == -21, "ERROR_DOMAIN_NOTFOUND");
_Static_assert(sizeof(libxl_error) == sizeof(int), "libxl_error is an int");
_Static_assert(sizeof(xentoollog_level) == sizeof(int), "xentoollog_level is an int");
_Static_assert(XTL_DEBUG == 1 && XTL_DETAIL == 3 && XTL_WARN == 7 && XTL_ERROR == 8, "XTL levels");
_Static_assert(XTL_STDIOSTREAM_HIDE_PROGRESS == 4, "XTL_STDIOSTREAM_HIDE_PROGRESS");
_Static_assert(sizeof(libxl_domid) == sizeof(uint32_t), "libxl_domid");
"#,
            align = layout::BUFFER_ALIGN,
            dominfo = layout::DOMINFO_BYTES,
            config = layout::DOMAIN_CONFIG_BYTES,
            restore = layout::RESTORE_PARAMS_BYTES,
        );
        let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
        let mut command = Command::new(&compiler);
        command.args(["-fsyntax-only", "-std=gnu11", "-x", "c", "-"]);
        for dir in includes {
            command.arg("-I").arg(dir);
        }
        let mut child = match command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => fail(&format!(
                "cannot run the C compiler `{compiler}` to check libxl's struct layouts \
                 against src/xen/ffi.rs ({e}); set CC"
            )),
        };
        if let Some(mut stdin) = child.stdin.take()
            && let Err(e) = stdin.write_all(source.as_bytes())
        {
            fail(&format!("cannot feed the C compiler: {e}"));
        }
        let output = match child.wait_with_output() {
            Ok(output) => output,
            Err(e) => fail(&format!("the C compiler `{compiler}` failed to run: {e}")),
        };
        if !output.status.success() {
            fail(&format!(
                "libxl.h does not match the FFI declarations of src/xen/ffi.rs:\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
}
