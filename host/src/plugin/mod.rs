//! Finding, loading and guarding plugins: the host's side of the `.so` boundary.
//!
//! ```text
//!  --plugin NAME|PATH ─▶ search::resolve ─▶ loader::load (ABI version, layout; or a C
//!     plugin's struct, c_plugin) ─▶ LoadedPlugin
//!     ─▶ LoadedPlugin::open(config) ─▶ ForeignDisk ─▶ guard::GuardedDisk (bounds, read-only,
//!        alignment, capability emulation, dirty tracking) ─▶ the device's workers
//! ```

pub mod bounded;
pub mod c_plugin;
pub mod dirty;
pub mod guard;
pub mod loader;
pub mod search;
pub mod stack;

pub use bounded::open_bounded;
pub use dirty::DirtyMap;
pub use guard::{CompletionTaker, GuardError, GuardedDisk};
pub use loader::{load, with_declared_defaults, KeyInfo, LoadedPlugin, PluginError};
pub use search::{find_plugins, resolve, search_path};
pub use stack::{open_stack, open_stack_read_only, Stack};
