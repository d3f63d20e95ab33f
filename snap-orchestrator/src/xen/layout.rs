// The sizes of the buffers that hold libxl's structs opaquely (see `ffi.rs`). Shared with
// build.rs, which refuses to build when libxl's struct is larger or more strictly aligned than
// its buffer (libxl 4.17 on x86_64: libxl_dominfo 120 bytes, libxl_domain_config 1288,
// libxl_domain_restore_params 24, all 8-aligned).

/// Bytes reserved for a `libxl_dominfo`.
pub const DOMINFO_BYTES: usize = 512;
/// Bytes reserved for a `libxl_domain_config`.
pub const DOMAIN_CONFIG_BYTES: usize = 8192;
/// Bytes reserved for a `libxl_domain_restore_params`.
pub const RESTORE_PARAMS_BYTES: usize = 256;
/// The alignment of every buffer.
pub const BUFFER_ALIGN: usize = 16;
