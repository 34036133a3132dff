//! `xen-disk-host plugins [list]` and `plugins inspect <plugin>`.

use crate::plugin::{find_plugins, load, loader::load_spec, search_path};
use anyhow::Result;
use clap::{Args, Subcommand};
use xen_disk_plugin_api::ffi::PluginKind;

#[derive(Args, Debug)]
pub struct PluginsArgs {
    #[command(subcommand)]
    command: Option<PluginsCommand>,
}

#[derive(Subcommand, Debug)]
enum PluginsCommand {
    /// List the plugins on the search path (the default).
    List,
    /// Show everything a plugin declares.
    Inspect {
        /// Plugin name or path.
        plugin: String,
    },
}

pub fn run(args: PluginsArgs) -> Result<i32> {
    match args.command.unwrap_or(PluginsCommand::List) {
        PluginsCommand::List => list(),
        PluginsCommand::Inspect { plugin } => inspect(&plugin),
    }
}

fn list() -> Result<i32> {
    let dirs: Vec<String> = search_path()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    println!("search path: {}", dirs.join(":"));
    let mut any = false;
    for path in find_plugins() {
        match load(&path) {
            Ok(p) => {
                any = true;
                println!(
                    "{:<12} {:<8} {}  ({})",
                    p.name,
                    p.version,
                    p.description,
                    path.display()
                );
            }
            // Other libraries may share a directory with plugins; say why each was passed over.
            Err(e) => println!("{:<12} {:<8} not loadable: {e}", "-", "-"),
        }
    }
    if !any {
        println!("no plugins found");
    }
    Ok(0)
}

fn inspect(spec: &str) -> Result<i32> {
    let p = load_spec(spec)?;
    println!("name:        {}", p.name);
    println!("version:     {}", p.version);
    println!("description: {}", p.description);
    println!("file:        {}", p.path.display());
    println!("abi version: {}", p.abi_text());
    match p.kind {
        PluginKind::Disk => println!("kind:        disk"),
        PluginKind::Filter => println!(
            "kind:        filter, opened over a base disk{}",
            if p.read_only_base {
                " (which it never writes: the base is opened read-only)"
            } else {
                ""
            }
        ),
    }
    println!("config keys:");
    if p.kind == PluginKind::Filter {
        // `base` is the host's key, not the plugin's: it names the layer below.
        println!(
            "  {:<16} {:<8} {:<18} The disk below: base=PLUGIN, and base.KEY=VALUE for its keys",
            "base", "plugin", "required"
        );
    } else if p.keys.is_empty() {
        println!("  (none)");
    }
    for k in &p.keys {
        let default = match (&k.default, k.required) {
            (Some(d), _) => format!("default {d}"),
            (None, true) => "required".to_string(),
            (None, false) => "optional".to_string(),
        };
        println!(
            "  {:<16} {:<8} {:<18} {}",
            k.name,
            k.ty.name(),
            default,
            k.help
        );
    }
    Ok(0)
}
