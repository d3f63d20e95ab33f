//! The libxl FFI: hand-written declarations of the few libxenlight and libxentoollog functions
//! the Xen driver uses (from libxl.h of Xen 4.17; build.rs checks the layouts and constants
//! against the installed headers), wrapped in safe types.
//!
//! Structs cross the boundary only as opaque, aligned buffers that libxl's own `_init` functions
//! fill and `_dispose` functions release ([`DomInfo`], [`DomainConfig`], [`RestoreParams`]);
//! their contents are read and written through libxl's JSON functions (`*_to_json`,
//! `*_from_json`), never by field offsets. The one struct laid out here is
//! `libxl_childproc_hooks` (three words, checked at build time).
//!
//! [`Libxl`] owns a `libxl_ctx` and its logger. libxl's context is thread-safe (libxl.h: "struct
//! libxl_ctx* is threadsafe"), so [`Libxl`] is `Send + Sync` and its blocking calls run on
//! tokio's blocking threads. Messages go to an unlinked temporary file (an unbuffered stdio
//! stream); after every call the new lines are forwarded to `tracing` (target `libxl`, debug) and
//! the last error line goes into the returned error, so the CLI prints one line.
//!
//! Child processes: libxl forks (save helper, device model, hotplug scripts). Its default SIGCHLD
//! mode installs its own handler and aborts the process when one is already installed, which
//! tokio does for `tokio::process`. So the context runs in `libxl_sigchld_owner_mainloop` mode:
//! the application tells libxl about every SIGCHLD with [`Libxl::sigchld_occurred`] (the driver
//! forwards tokio's SIGCHLD stream to it) and libxl reaps only its own children.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use nix::libc;
use snap_core::{Error, ErrorKind, Result};

use super::layout::{BUFFER_ALIGN, DOMAIN_CONFIG_BYTES, DOMINFO_BYTES, RESTORE_PARAMS_BYTES};

// ---------------------------------------------------------------------------------------------
// Raw declarations

/// `libxl_ctx` (opaque).
#[repr(C)]
struct RawCtx {
    _private: [u8; 0],
}

/// `xentoollog_logger_stdiostream` (opaque; starts with a `xentoollog_logger`).
#[repr(C)]
struct RawLogger {
    _private: [u8; 0],
}

/// `libxl_childproc_hooks` (layout checked by build.rs).
#[repr(C)]
struct ChildprocHooks {
    chldowner: c_int,
    fork_replacement: Option<unsafe extern "C" fn(*mut c_void) -> libc::pid_t>,
    reaped_callback: Option<unsafe extern "C" fn(libc::pid_t, c_int, *mut c_void) -> c_int>,
}

/// `LIBXL_VERSION`.
const LIBXL_VERSION: c_int = 0;
/// `LIBXL_SUSPEND_LIVE`.
const LIBXL_SUSPEND_LIVE: c_int = 2;
/// `ERROR_INVAL` (what `libxl_name_to_domid` returns for an unknown name).
const ERROR_INVAL: c_int = -6;
/// `ERROR_DOMAIN_NOTFOUND`.
const ERROR_DOMAIN_NOTFOUND: c_int = -21;
/// `libxl_sigchld_owner_mainloop`.
const SIGCHLD_OWNER_MAINLOOP: c_int = 1;
/// `XTL_DEBUG`, `XTL_WARN` (xentoollog levels).
const XTL_DEBUG: c_int = 1;
const XTL_WARN: c_int = 7;
/// `XTL_STDIOSTREAM_HIDE_PROGRESS`.
const XTL_HIDE_PROGRESS: c_uint = 4;
/// `INVALID_DOMID`.
const INVALID_DOMID: u32 = !0;

/// The hooks of mainloop mode: no fork replacement, no reaped callback. libxl keeps the
/// pointer for the context's lifetime, hence a static.
static MAINLOOP_HOOKS: ChildprocHooks = ChildprocHooks {
    chldowner: SIGCHLD_OWNER_MAINLOOP,
    fork_replacement: None,
    reaped_callback: None,
};

// Linked through pkg-config by build.rs (xenlight, xentoollog).
unsafe extern "C" {
    fn libxl_ctx_alloc(
        pctx: *mut *mut RawCtx,
        version: c_int,
        flags: c_uint,
        lg: *mut RawLogger,
    ) -> c_int;
    fn libxl_ctx_free(ctx: *mut RawCtx) -> c_int;
    fn libxl_childproc_setmode(ctx: *mut RawCtx, hooks: *const ChildprocHooks, user: *mut c_void);
    fn libxl_childproc_sigchld_occurred(ctx: *mut RawCtx);
    fn libxl_error_to_string(error: c_int) -> *const c_char;

    fn libxl_name_to_domid(ctx: *mut RawCtx, name: *const c_char, domid: *mut u32) -> c_int;
    fn libxl_domid_to_name(ctx: *mut RawCtx, domid: u32) -> *mut c_char;

    fn libxl_dominfo_init(p: *mut c_void);
    fn libxl_dominfo_dispose(p: *mut c_void);
    fn libxl_dominfo_to_json(ctx: *mut RawCtx, p: *mut c_void) -> *mut c_char;
    fn libxl_domain_info(ctx: *mut RawCtx, info: *mut c_void, domid: u32) -> c_int;

    fn libxl_domain_pause(ctx: *mut RawCtx, domid: u32, ao_how: *const c_void) -> c_int;
    fn libxl_domain_unpause(ctx: *mut RawCtx, domid: u32, ao_how: *const c_void) -> c_int;
    fn libxl_domain_destroy(ctx: *mut RawCtx, domid: u32, ao_how: *const c_void) -> c_int;
    fn libxl_domain_suspend(
        ctx: *mut RawCtx,
        domid: u32,
        fd: c_int,
        flags: c_int,
        ao_how: *const c_void,
    ) -> c_int;
    fn libxl_domain_resume(
        ctx: *mut RawCtx,
        domid: u32,
        suspend_cancel: c_int,
        ao_how: *const c_void,
    ) -> c_int;

    fn libxl_domain_config_init(p: *mut c_void);
    fn libxl_domain_config_dispose(p: *mut c_void);
    fn libxl_domain_config_to_json(ctx: *mut RawCtx, p: *mut c_void) -> *mut c_char;
    fn libxl_domain_config_from_json(ctx: *mut RawCtx, p: *mut c_void, s: *const c_char) -> c_int;
    fn libxl_retrieve_domain_configuration(
        ctx: *mut RawCtx,
        domid: u32,
        config: *mut c_void,
        ao_how: *const c_void,
    ) -> c_int;
    fn libxl_domain_create_new(
        ctx: *mut RawCtx,
        config: *mut c_void,
        domid: *mut u32,
        ao_how: *const c_void,
        aop_console_how: *const c_void,
    ) -> c_int;
    fn libxl_domain_create_restore(
        ctx: *mut RawCtx,
        config: *mut c_void,
        domid: *mut u32,
        restore_fd: c_int,
        send_back_fd: c_int,
        params: *const c_void,
        ao_how: *const c_void,
        aop_console_how: *const c_void,
    ) -> c_int;

    fn libxl_domain_restore_params_init(p: *mut c_void);
    fn libxl_domain_restore_params_dispose(p: *mut c_void);
    fn libxl_domain_restore_params_from_json(
        ctx: *mut RawCtx,
        p: *mut c_void,
        s: *const c_char,
    ) -> c_int;

    fn xtl_createlogger_stdiostream(
        f: *mut libc::FILE,
        min_level: c_int,
        flags: c_uint,
    ) -> *mut RawLogger;
    fn xtl_logger_destroy(logger: *mut RawLogger);
}

// ---------------------------------------------------------------------------------------------
// Opaque struct buffers

/// Room for one libxl struct, aligned like the strictest C type.
#[repr(C, align(16))]
struct Buffer<const N: usize>([MaybeUninit<u8>; N]);

const _: () = assert!(std::mem::align_of::<Buffer<1>>() == BUFFER_ALIGN);

impl<const N: usize> Buffer<N> {
    fn boxed() -> Box<Self> {
        Box::new(Buffer([MaybeUninit::zeroed(); N]))
    }
}

/// A libxl struct in a heap buffer: initialised by its `_init` on creation, released by its
/// `_dispose` on drop.
macro_rules! libxl_struct {
    ($(#[$doc:meta])* $name:ident, $bytes:expr, $init:ident, $dispose:ident) => {
        $(#[$doc])*
        struct $name(Box<Buffer<$bytes>>);

        impl $name {
            fn new() -> Self {
                let mut buffer = Buffer::<$bytes>::boxed();
                // SAFETY: the buffer is at least as large and as aligned as the struct (checked
                // by build.rs against libxl.h) and lives on the heap for the value's lifetime;
                // `_init` only writes into it.
                unsafe { $init(buffer.0.as_mut_ptr().cast()) };
                $name(buffer)
            }

            fn ptr(&mut self) -> *mut c_void {
                self.0.0.as_mut_ptr().cast()
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the struct was initialised by `_init` in `new` and is disposed once;
                // `_dispose` frees what libxl allocated for its members.
                unsafe { $dispose(self.ptr()) };
            }
        }
    };
}

libxl_struct!(
    /// A `libxl_dominfo`.
    DomInfo,
    DOMINFO_BYTES,
    libxl_dominfo_init,
    libxl_dominfo_dispose
);
libxl_struct!(
    /// A `libxl_domain_config`.
    DomainConfig,
    DOMAIN_CONFIG_BYTES,
    libxl_domain_config_init,
    libxl_domain_config_dispose
);
libxl_struct!(
    /// A `libxl_domain_restore_params`.
    RestoreParams,
    RESTORE_PARAMS_BYTES,
    libxl_domain_restore_params_init,
    libxl_domain_restore_params_dispose
);

/// Takes a string libxl allocated with malloc (NULL: none).
fn take_c_string(ptr: *mut c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: libxl returns a NUL-terminated string it allocated with malloc (libxl.h: "all
    // returned allocated structures are obtained from malloc() and must be freed by the
    // caller"); it is read once, then freed once.
    let text = unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: see above; `ptr` is not used after this.
    unsafe { libc::free(ptr.cast()) };
    Some(text)
}

fn c_text(what: &str, text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| Error::invalid(format!("{what} contains a NUL byte")))
}

// ---------------------------------------------------------------------------------------------
// The logger

/// libxl's logger: a stdio stream on an unlinked temporary file, read back through a second
/// descriptor of the same file.
#[derive(Debug)]
struct Log {
    file: *mut libc::FILE,
    logger: *mut RawLogger,
    reader: File,
    read: Mutex<u64>,
}

impl Log {
    fn new() -> Result<Log> {
        // SAFETY: tmpfile has no preconditions; it returns NULL on failure.
        let file = unsafe { libc::tmpfile() };
        if file.is_null() {
            return Err(Error::io(
                "create libxl's log file",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `file` is a valid stream not yet used; unbuffered, every message reaches the
        // file at once, so reading it back needs no flush.
        unsafe { libc::setvbuf(file, std::ptr::null_mut(), libc::_IONBF, 0) };
        // SAFETY: `file` is valid; fileno returns its descriptor, which dup copies.
        let fd = unsafe { libc::dup(libc::fileno(file)) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: `file` is valid and closed once.
            unsafe { libc::fclose(file) };
            return Err(Error::io("duplicate libxl's log file", e));
        }
        // SAFETY: `fd` is a fresh descriptor from dup that nothing else owns.
        let reader = unsafe { File::from_raw_fd(fd) };
        let level = if tracing::enabled!(target: "libxl", tracing::Level::DEBUG) {
            XTL_DEBUG
        } else {
            XTL_WARN
        };
        // SAFETY: `file` is a valid stream that outlives the logger (destroyed first in Drop).
        let logger = unsafe { xtl_createlogger_stdiostream(file, level, XTL_HIDE_PROGRESS) };
        if logger.is_null() {
            // SAFETY: `file` is valid and closed once.
            unsafe { libc::fclose(file) };
            return Err(Error::new(
                ErrorKind::Io,
                "cannot create libxl's logger (out of memory)",
            ));
        }
        Ok(Log {
            file,
            logger,
            reader,
            read: Mutex::new(0),
        })
    }

    /// The lines written since the last call, forwarded to `tracing`.
    fn drain(&self) -> Vec<String> {
        let Ok(mut read) = self.read.lock() else {
            return Vec::new();
        };
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match self.reader.read_at(&mut chunk, *read) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    bytes.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    *read += n as u64;
                }
            }
            if bytes.len() > 1 << 20 {
                break;
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        for line in &lines {
            tracing::debug!(target: "libxl", "{line}");
        }
        lines
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // SAFETY: the logger was created in `new`, the context that used it is freed before
        // (Libxl's Drop), and it is destroyed once; it does not close the stream.
        unsafe { xtl_logger_destroy(self.logger) };
        // SAFETY: the stream was opened in `new` and is closed once, after its logger is gone.
        unsafe { libc::fclose(self.file) };
    }
}

/// `(level, message)` of a xentoollog stdio line (`CONTEXT: LEVEL: MESSAGE`), with libxl's
/// `FILE.c:LINE:FUNCTION: ` source prefix dropped.
pub fn parse_log_line(line: &str) -> Option<(&str, &str)> {
    let (_context, rest) = line.split_once(": ")?;
    let (level, message) = rest.split_once(": ")?;
    if !level
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return None;
    }
    let message = match message.split_once(": ") {
        Some((source, rest)) if is_source_prefix(source) => rest,
        _ => message,
    };
    Some((level, message.trim()))
}

/// `libxl.c:102:libxl_ctx_alloc` (a C file, a line number, a function).
fn is_source_prefix(text: &str) -> bool {
    let mut parts = text.split(':');
    let (Some(file), Some(line), Some(function), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    file.ends_with(".c")
        && !line.is_empty()
        && line.chars().all(|c| c.is_ascii_digit())
        && !function.is_empty()
        && function
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The message of the last error in `lines`, preferring libxl's own over its libraries'.
pub fn last_error(lines: &[String]) -> Option<String> {
    let errors: Vec<(&str, &str)> = lines
        .iter()
        .filter_map(|l| {
            let (level, message) = parse_log_line(l)?;
            matches!(level, "error" | "critical").then(|| (l.as_str(), message))
        })
        .collect();
    errors
        .iter()
        .rev()
        .find(|(line, _)| line.starts_with("libxl: "))
        .or(errors.last())
        .map(|(_, message)| message.to_string())
}

/// libxl's name of an error code (`ERROR_FAIL`).
fn error_name(rc: c_int) -> String {
    // SAFETY: libxl_error_to_string takes any integer and returns a static string or NULL.
    let name = unsafe { libxl_error_to_string(rc) };
    if name.is_null() {
        return format!("error {rc}");
    }
    // SAFETY: a non-NULL result points to a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
    format!("ERROR_{}", name.to_ascii_uppercase())
}

// ---------------------------------------------------------------------------------------------
// The context

/// A libxl context with its logger, in SIGCHLD mainloop mode.
#[derive(Debug)]
pub struct Libxl {
    ctx: *mut RawCtx,
    log: Log,
}

// SAFETY: libxl's context is thread-safe (libxl.h, "libxl memory management": "struct libxl_ctx*
// is threadsafe"); the log reader is a File and a Mutex; the raw stream and logger are only
// touched by libxl (which serialises through the context's lock) and by Drop.
unsafe impl Send for Libxl {}
// SAFETY: as for Send.
unsafe impl Sync for Libxl {}

impl Libxl {
    /// Opens a context; fails with libxl's reason where there is no Xen (e.g. "cannot open
    /// libxc handle: No such file or directory").
    pub fn open() -> Result<Libxl> {
        let log = Log::new()?;
        let mut ctx: *mut RawCtx = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid out pointer; the logger outlives the context (Drop order).
        let rc = unsafe { libxl_ctx_alloc(&mut ctx, LIBXL_VERSION, 0, log.logger) };
        let lines = log.drain();
        if rc != 0 || ctx.is_null() {
            let why = last_error(&lines).unwrap_or_else(|| error_name(rc));
            return Err(Error::new(ErrorKind::Unsupported, why));
        }
        // SAFETY: `ctx` is a fresh context with no children yet (setmode's precondition); the
        // hooks are static, so they outlive it.
        unsafe { libxl_childproc_setmode(ctx, &MAINLOOP_HOOKS, std::ptr::null_mut()) };
        Ok(Libxl { ctx, log })
    }

    /// Tells libxl a SIGCHLD arrived: it reaps whichever of its children exited (never
    /// other processes'). Not for signal handlers; any thread.
    pub fn sigchld_occurred(&self) {
        // SAFETY: the context is valid and in mainloop mode (set in `open`).
        unsafe { libxl_childproc_sigchld_occurred(self.ctx) };
        self.log.drain();
    }

    fn check(&self, what: &str, rc: c_int) -> Result<()> {
        let lines = self.log.drain();
        if rc == 0 {
            return Ok(());
        }
        let mut message = format!("libxl: {what} failed ({})", error_name(rc));
        if let Some(why) = last_error(&lines) {
            message.push_str(": ");
            message.push_str(&why);
        }
        let kind = if rc == ERROR_DOMAIN_NOTFOUND {
            ErrorKind::NotFound
        } else {
            ErrorKind::Command
        };
        Err(Error::new(kind, message))
    }

    /// The domid of the domain named `name`; None when there is none.
    pub fn domid_of(&self, name: &str) -> Result<Option<u32>> {
        let c_name = c_text("domain name", name)?;
        let mut domid = INVALID_DOMID;
        // SAFETY: valid context, NUL-terminated name, valid out pointer.
        let rc = unsafe { libxl_name_to_domid(self.ctx, c_name.as_ptr(), &mut domid) };
        if rc == ERROR_INVAL {
            self.log.drain();
            return Ok(None);
        }
        self.check(&format!("looking up domain {name}"), rc)?;
        Ok(Some(domid))
    }

    /// The name of domain `domid`, if it exists and has one.
    pub fn name_of(&self, domid: u32) -> Option<String> {
        // SAFETY: valid context; the result is a malloc'd string or NULL.
        let name = take_c_string(unsafe { libxl_domid_to_name(self.ctx, domid) });
        self.log.drain();
        name
    }

    /// `libxl_dominfo` of domain `domid` as libxl's JSON; None when it does not exist.
    pub fn domain_info_json(&self, domid: u32) -> Result<Option<String>> {
        let mut info = DomInfo::new();
        // SAFETY: valid context; `info` is an initialised libxl_dominfo.
        let rc = unsafe { libxl_domain_info(self.ctx, info.ptr(), domid) };
        if rc == ERROR_DOMAIN_NOTFOUND {
            self.log.drain();
            return Ok(None);
        }
        self.check(&format!("reading the state of domain {domid}"), rc)?;
        // SAFETY: valid context; `info` was filled by libxl_domain_info.
        let json = take_c_string(unsafe { libxl_dominfo_to_json(self.ctx, info.ptr()) });
        self.log.drain();
        json.map(Some).ok_or_else(|| {
            Error::new(
                ErrorKind::Command,
                "libxl could not describe the domain's state",
            )
        })
    }

    /// Pauses every vCPU (a counted, toolstack-level pause).
    pub fn pause(&self, domid: u32) -> Result<()> {
        // SAFETY: valid context; NULL ao_how makes the call synchronous.
        let rc = unsafe { libxl_domain_pause(self.ctx, domid, std::ptr::null()) };
        self.check(&format!("pausing domain {domid}"), rc)
    }

    /// Undoes one [`Libxl::pause`] (for HVM also resumes the device model).
    pub fn unpause(&self, domid: u32) -> Result<()> {
        // SAFETY: valid context; NULL ao_how makes the call synchronous.
        let rc = unsafe { libxl_domain_unpause(self.ctx, domid, std::ptr::null()) };
        self.check(&format!("unpausing domain {domid}"), rc)
    }

    /// Destroys the domain at once.
    pub fn destroy(&self, domid: u32) -> Result<()> {
        // SAFETY: valid context; NULL ao_how makes the call synchronous.
        let rc = unsafe { libxl_domain_destroy(self.ctx, domid, std::ptr::null()) };
        self.check(&format!("destroying domain {domid}"), rc)
    }

    /// Writes the domain's memory and device state to `fd` (libxl's v2 stream). `live`: copy
    /// while the guest runs, stopping it for the last round only. Afterwards the domain is
    /// shut down with reason "suspend" (see [`Libxl::resume`]).
    pub fn suspend(&self, domid: u32, fd: BorrowedFd<'_>, live: bool) -> Result<()> {
        let flags = if live { LIBXL_SUSPEND_LIVE } else { 0 };
        // SAFETY: valid context; `fd` stays open for the call (borrowed); NULL ao_how makes
        // the call synchronous.
        let rc = unsafe {
            libxl_domain_suspend(self.ctx, domid, fd.as_raw_fd(), flags, std::ptr::null())
        };
        self.check(&format!("saving the memory of domain {domid}"), rc)
    }

    /// Resumes a suspended domain; `suspend_cancel`: the guest continues where it was (its
    /// suspend hypercall returns "cancelled"), as after `xl save -c`.
    pub fn resume(&self, domid: u32, suspend_cancel: bool) -> Result<()> {
        // SAFETY: valid context; NULL ao_how makes the call synchronous.
        let rc = unsafe {
            libxl_domain_resume(
                self.ctx,
                domid,
                c_int::from(suspend_cancel),
                std::ptr::null(),
            )
        };
        self.check(&format!("resuming domain {domid}"), rc)
    }

    /// The running domain's configuration as libxl keeps it (`libxl_domain_config` JSON).
    pub fn retrieve_config_json(&self, domid: u32) -> Result<String> {
        let mut config = DomainConfig::new();
        // SAFETY: valid context; `config` is an initialised libxl_domain_config; NULL ao_how
        // makes the call synchronous.
        let rc = unsafe {
            libxl_retrieve_domain_configuration(self.ctx, domid, config.ptr(), std::ptr::null())
        };
        self.check(&format!("reading the configuration of domain {domid}"), rc)?;
        self.config_to_json(&mut config)
    }

    fn config_to_json(&self, config: &mut DomainConfig) -> Result<String> {
        // SAFETY: valid context; `config` is initialised.
        let json = take_c_string(unsafe { libxl_domain_config_to_json(self.ctx, config.ptr()) });
        self.log.drain();
        json.ok_or_else(|| {
            Error::new(
                ErrorKind::Command,
                "libxl could not write the domain configuration as JSON",
            )
        })
    }

    fn config_from_json(&self, json: &str) -> Result<DomainConfig> {
        let text = c_text("the domain configuration", json)?;
        let mut config = DomainConfig::new();
        // SAFETY: valid context; `config` is initialised; `text` is NUL-terminated.
        let rc = unsafe { libxl_domain_config_from_json(self.ctx, config.ptr(), text.as_ptr()) };
        self.check("reading the domain configuration JSON", rc)?;
        Ok(config)
    }

    /// `json` read into a `libxl_domain_config` and written back: what libxl makes of it.
    #[cfg(test)]
    pub fn normalize_config_json(&self, json: &str) -> Result<String> {
        let mut config = self.config_from_json(json)?;
        self.config_to_json(&mut config)
    }

    /// Creates a domain from `config_json`, fresh or (`restore`) from a memory image written by
    /// [`Libxl::suspend`]; the domain is left paused. Returns its domid.
    pub fn create(&self, config_json: &str, restore: Option<BorrowedFd<'_>>) -> Result<u32> {
        let mut config = self.config_from_json(config_json)?;
        let mut domid = INVALID_DOMID;
        let rc = match restore {
            None => {
                // SAFETY: valid context; `config` is an initialised, filled libxl_domain_config;
                // `domid` is a valid out pointer; NULL ao_how / console how: synchronous, no
                // console progress.
                unsafe {
                    libxl_domain_create_new(
                        self.ctx,
                        config.ptr(),
                        &mut domid,
                        std::ptr::null(),
                        std::ptr::null(),
                    )
                }
            }
            Some(fd) => {
                let mut params = RestoreParams::new();
                // libxl_domain_suspend writes a v2 stream (LIBXL_HAVE_SRM_V2).
                let text = c_text("restore parameters", r#"{"stream_version": 2}"#)?;
                // SAFETY: valid context; `params` is initialised; `text` is NUL-terminated.
                let rc = unsafe {
                    libxl_domain_restore_params_from_json(self.ctx, params.ptr(), text.as_ptr())
                };
                self.check("setting the restore parameters", rc)?;
                // SAFETY: as for create_new; `fd` stays open for the call (borrowed); no
                // send-back descriptor (-1).
                unsafe {
                    libxl_domain_create_restore(
                        self.ctx,
                        config.ptr(),
                        &mut domid,
                        fd.as_raw_fd(),
                        -1,
                        params.ptr(),
                        std::ptr::null(),
                        std::ptr::null(),
                    )
                }
            }
        };
        self.check(
            if restore.is_some() {
                "restoring the domain"
            } else {
                "creating the domain"
            },
            rc,
        )?;
        Ok(domid)
    }
}

impl Drop for Libxl {
    fn drop(&mut self) {
        // SAFETY: the context was allocated in `open` and is freed once; `log` (its logger) is
        // dropped after this body.
        unsafe { libxl_ctx_free(self.ctx) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines() {
        assert_eq!(
            parse_log_line(
                "libxl: error: libxl.c:102:libxl_ctx_alloc: cannot open libxc handle: No such file or directory"
            ),
            Some((
                "error",
                "cannot open libxc handle: No such file or directory"
            ))
        );
        assert_eq!(
            parse_log_line(
                "xencall: error: Could not obtain handle on privileged command interface: No such file or directory"
            ),
            Some((
                "error",
                "Could not obtain handle on privileged command interface: No such file or directory"
            ))
        );
        assert_eq!(parse_log_line("no separators"), None);
        assert_eq!(parse_log_line("a: Not A Level: x"), None);
        let lines = vec![
            "xencall: error: Could not obtain handle: ENOENT".to_string(),
            "libxl: error: libxl.c:102:libxl_ctx_alloc: cannot open libxc handle: ENOENT"
                .to_string(),
            "libxl: debug: libxl.c:1:f: later detail".to_string(),
        ];
        assert_eq!(
            last_error(&lines).as_deref(),
            Some("cannot open libxc handle: ENOENT")
        );
        assert_eq!(
            last_error(&lines[..1]).as_deref(),
            Some("Could not obtain handle: ENOENT")
        );
        assert_eq!(last_error(&lines[2..]), None);
    }

    #[test]
    fn error_names() {
        assert_eq!(error_name(-3), "ERROR_FAIL");
        assert_eq!(error_name(ERROR_DOMAIN_NOTFOUND), "ERROR_DOMAIN_NOTFOUND");
        assert_eq!(error_name(-9999), "error -9999");
    }

    /// Without a Xen hypervisor (as on CI) the context cannot open and says why; on a dom0 it
    /// opens.
    #[test]
    fn open_fails_cleanly_without_xen() {
        match Libxl::open() {
            Ok(_) => assert!(crate::domain::is_xen_dom0()),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Unsupported);
                assert!(!e.message().is_empty());
                assert!(!e.message().contains('\n'));
            }
        }
    }
}
