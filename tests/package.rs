//! The Debian packages (`dist/build-deb.sh`), built from the debug build: their contents and
//! metadata, the service unit (`systemd-analyze verify`), the man page against the CLI, the
//! example `disks.toml` against the real parser, and the binary unpacked from the package
//! (`dpkg-deb -x` into a directory; nothing is installed on this machine) serving the
//! simulator from its own plugin directory, started by the unit's ExecStart line.

mod common;

use common::{build_all, random_file, stderr, stdout, target_dir, TempDir};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The plugin crates' library names (`[lib] name` of plugins/*/Cargo.toml).
fn plugin_libs() -> Vec<String> {
    let mut libs = Vec::new();
    for entry in std::fs::read_dir(repo().join("plugins")).unwrap() {
        let toml = entry.unwrap().path().join("Cargo.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        let lib = text
            .split("[lib]")
            .nth(1)
            .and_then(|t| t.lines().find(|l| l.trim_start().starts_with("name")))
            .and_then(|l| l.split('"').nth(1))
            .unwrap_or_else(|| panic!("{}: no [lib] name", toml.display()))
            .to_string();
        libs.push(lib);
    }
    libs.sort();
    libs
}

/// Plugins packaged on their own (they link libnbd, librbd).
const OWN_PACKAGE: [&str; 2] = ["nbd_client", "ceph_rbd"];

struct Built {
    dir: PathBuf,
    /// The packages' paths, by package name.
    debs: Vec<(String, PathBuf)>,
}

/// Builds the packages once per test binary, into target/debug/package-test.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        build_all();
        let dir = target_dir().join("package-test");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let profile = target_dir()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let o = Command::new("bash")
            .arg(repo().join("dist/build-deb.sh"))
            .args(["--profile", &profile, "--no-build", "--out"])
            .arg(&dir)
            // No compression: the test's packages are unpacked at once and thrown away.
            .env("DEB_COMPRESS", "none")
            .output()
            .expect("run dist/build-deb.sh");
        assert!(o.status.success(), "build-deb.sh failed: {}", stderr(&o));
        let debs = stdout(&o)
            .lines()
            .map(|l| {
                let p = PathBuf::from(l);
                let name = p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .split('_')
                    .next()
                    .unwrap()
                    .to_string();
                assert!(p.is_file(), "{l} printed but not there");
                (name, p)
            })
            .collect();
        Built { dir, debs }
    })
}

fn deb(name: &str) -> &'static Path {
    &built()
        .debs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no package {name} among {:?}", built().debs))
        .1
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// `dpkg-deb -c`: each file's mode, owner and path (without the leading `.`).
fn contents(deb: &Path) -> Vec<(String, String, String)> {
    run(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5)?.trim_start_matches('.').to_string();
            (!path.ends_with('/')).then(|| (f[0].to_string(), f[1].to_string(), path))
        })
        .collect()
}

fn field(deb: &Path, name: &str) -> String {
    run(Command::new("dpkg-deb").args(["-f"]).arg(deb).arg(name))
        .trim()
        .to_string()
}

/// The packages unpacked into one directory, as dpkg would lay them out (once).
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = built().dir.join("root");
        for (_, deb) in &built().debs {
            run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
        }
        root
    })
}

/// The unpacked binary, with no plugin path from the environment: it finds the plugins
/// where the package put them.
fn installed(args: &[&str]) -> Command {
    let mut c = Command::new(root().join("usr/bin/xen-disk-host"));
    c.args(args).env_remove("XEN_DISK_PLUGIN_PATH");
    c
}

#[test]
fn the_main_package_holds_the_binary_plugins_unit_config_and_man_page() {
    let files = contents(deb("xen-disk"));
    let paths: BTreeSet<&str> = files.iter().map(|(_, _, p)| p.as_str()).collect();
    let mut want: BTreeSet<String> = [
        "/usr/bin/xen-disk-host",
        "/usr/lib/systemd/system/xen-disk.service",
        "/etc/xen-disk/disks.toml",
        "/usr/share/man/man8/xen-disk-host.8.gz",
        "/usr/share/doc/xen-disk/copyright",
    ]
    .map(String::from)
    .into();
    for lib in plugin_libs() {
        if !OWN_PACKAGE.contains(&lib.as_str()) {
            want.insert(format!("/usr/lib/xen-disk/plugins/lib{lib}.so"));
        }
    }
    want.insert("/etc/xen/scripts/block-xen-disk".into());
    let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(paths, want);
    for (mode, owner, path) in &files {
        assert_eq!(owner, "root/root", "{path}");
        let exec = path == "/usr/bin/xen-disk-host" || path == "/etc/xen/scripts/block-xen-disk";
        assert_eq!(
            mode,
            if exec { "-rwxr-xr-x" } else { "-rw-r--r--" },
            "{path}"
        );
    }
    let conffiles = run(Command::new("dpkg-deb")
        .args(["--info"])
        .arg(deb("xen-disk"))
        .arg("conffiles"));
    let want_conf = vec![
        "/etc/xen-disk/disks.toml",
        "/etc/xen/scripts/block-xen-disk",
    ];
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), want_conf);
    // Only what the binary and these plugins link: libc and libgcc, not Ceph or libnbd.
    let depends = field(deb("xen-disk"), "Depends");
    assert!(depends.contains("libc6 (>= "), "{depends}");
    assert!(
        !depends.contains("librbd") && !depends.contains("libnbd"),
        "{depends}"
    );
    let suggests = field(deb("xen-disk"), "Suggests");
    assert_eq!(
        suggests,
        "xen-disk-plugin-nbd-client, xen-disk-plugin-ceph-rbd"
    );
    let version = field(deb("xen-disk"), "Version");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn plugins_with_libraries_of_their_own_have_packages_of_their_own() {
    let version = env!("CARGO_PKG_VERSION");
    for (lib, needs) in [("nbd_client", "libnbd0"), ("ceph_rbd", "librbd1")] {
        let name = format!("xen-disk-plugin-{}", lib.replace('_', "-"));
        let files = contents(deb(&name));
        let paths: Vec<&str> = files.iter().map(|(_, _, p)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                format!("/usr/lib/xen-disk/plugins/lib{lib}.so"),
                format!("/usr/share/doc/{name}/copyright")
            ]
        );
        let depends = field(deb(&name), "Depends");
        assert!(
            depends.starts_with(&format!("xen-disk (= {version}), ")),
            "{depends}"
        );
        assert!(depends.contains(needs), "{name}: {depends}");
    }
    // Every plugin of the workspace is in one package or another, nothing else is.
    assert_eq!(built().debs.len(), 1 + OWN_PACKAGE.len());
}

#[test]
fn the_unpacked_binary_finds_its_plugins_and_serves_the_simulator() {
    let out = run(&mut installed(&["plugins"]));
    for lib in plugin_libs() {
        let name = lib.replace('_', "-");
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(&name)),
            "{name} not listed: {out}"
        );
    }
    let dir = root().join("usr/lib/xen-disk/plugins");
    assert!(out.contains(&dir.display().to_string()), "{out}");
    // The separately packaged plugins load too (their libraries are this machine's).
    for name in ["nbd-client", "ceph-rbd"] {
        let o = run(&mut installed(&["plugins", "inspect", name]));
        assert!(o.contains(name), "{o}");
    }
    // A simulated guest writes and reads back a disk through the packaged file plugin.
    let t = TempDir::new("pkg-sim");
    let (img, data, back) = (t.join("d.img"), t.join("in"), t.join("out"));
    random_file(&data, 4 << 20, 20);
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let c = format!("path={}", img.display());
    run(installed(&["sim", "write", "file", "-c", &c, "--in"]).arg(&data));
    run(installed(&["sim", "read", "file", "-c", &c, "--out"]).arg(&back));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&data).unwrap());
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&data).unwrap());
}

/// The example file with every example uncommented: lines where `#` stands right before a
/// key or a table.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_disks_toml_parses_as_shipped_and_with_its_examples_uncommented() {
    use xen_disk_host::backend::disks_config::parse_disks;
    let path = root().join("etc/xen-disk/disks.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        std::fs::read_to_string(repo().join("dist/disks.toml")).unwrap()
    );
    let shipped = parse_disks(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    assert!(shipped.is_empty(), "the shipped file serves nothing");
    let examples = uncommented(&text);
    let disks = parse_disks(&path, &examples).unwrap_or_else(|e| panic!("{e}\n{examples}"));
    let plugins: Vec<&str> = disks.iter().map(|d| d.plugin.as_str()).collect();
    assert_eq!(plugins, ["file", "qcow2", "cow"]);
    for d in &disks {
        let table = d.plugin_config.table();
        assert!(
            table.contains_key("path") || table.contains_key("overlay"),
            "{table:?}"
        );
        // Every example names a plugin the packages ship.
        let file = format!("lib{}.so", d.plugin.replace('-', "_"));
        assert!(
            root()
                .join("usr/lib/xen-disk/plugins")
                .join(&file)
                .is_file(),
            "{file}"
        );
    }
    assert!(disks[1].readonly && disks[1].sector_size == Some(4096));
    let base = disks[2].plugin_config.table().get("base");
    assert!(
        base.and_then(|b| b.get("plugin")).and_then(|p| p.as_str()) == Some("file"),
        "{base:?}"
    );
}

/// The unit's `KEY=` line, unescaped as systemd reads it.
fn unit_line(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_string()
}

#[test]
fn the_unit_verifies_and_runs_the_packaged_serve_with_the_packaged_config() {
    let unit_path = root().join("usr/lib/systemd/system/xen-disk.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let exec = unit_line(&unit, "ExecStart");
    assert_eq!(
        exec,
        "/usr/bin/xen-disk-host serve --config /etc/xen-disk/disks.toml"
    );
    assert_eq!(unit_line(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(unit_line(&unit, "After").contains("xenstored.service"));
    // systemd-analyze checks the commands exist and the man page it names: this copy runs
    // the unpacked binary, and man looks in the unpacked man pages. Any warning fails.
    let t = TempDir::new("pkg-unit");
    let copy = t.join("xen-disk.service");
    let bin = root().join("usr/bin/xen-disk-host");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/xen-disk-host", &bin.display().to_string()),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("MANPATH", root().join("usr/share/man"))
        .current_dir(&t.0)
        .output()
        .expect("run systemd-analyze (package systemd)");
    assert!(
        o.status.success() && stderr(&o).trim().is_empty(),
        "systemd-analyze verify: {}{}",
        stdout(&o),
        stderr(&o)
    );

    // ExecStart as the unit has it, on the unpacked tree, with the package's disks.toml
    // given one disk, against the simulator: the simulated guest connects to it.
    let img = t.join("d.img");
    random_file(&img, 2 << 20, 21);
    let config = root().join("etc/xen-disk/disks.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&format!(
        "\n[[disk]]\ndomain = \"pkg1\"\nplugin = \"file\"\n[disk.plugin-config]\npath = \"{}\"\n",
        img.display()
    ));
    let edited = t.join("disks.toml");
    std::fs::write(&edited, toml).unwrap();
    let words: Vec<String> = exec
        .split_whitespace()
        .map(|w| match w {
            "/usr/bin/xen-disk-host" => bin.display().to_string(),
            "/etc/xen-disk/disks.toml" => edited.display().to_string(),
            w => w.to_string(),
        })
        .collect();
    let mut child = Command::new(&words[0])
        .args(&words[1..])
        .arg("--sim")
        .arg("--control")
        .arg(t.join("ctl.sock"))
        .env_remove("XEN_DISK_PLUGIN_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let connected = loop {
        match lines.next() {
            Some(Ok(l)) => {
                let hit = l.contains("connected") && l.contains("2097152 bytes");
                seen.push(l);
                if hit {
                    break true;
                }
            }
            _ => break false,
        }
    };
    // SAFETY: signalling our own child, which has not been waited for yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    seen.extend(lines.map_while(Result::ok));
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(connected, "no simulated guest connected: {seen:?} {err}");
    assert_eq!(status.code(), Some(0), "{seen:?} {err}");
    assert_eq!(seen.last().map(String::as_str), Some("stopped"), "{seen:?}");
}

/// The subcommands `--help` lists (not `help`), with their own, recursively.
fn subcommands(prefix: &[String]) -> Vec<Vec<String>> {
    let mut args: Vec<&str> = prefix.iter().map(String::as_str).collect();
    args.push("--help");
    let help = run(&mut installed(&args));
    let mut out = Vec::new();
    let Some(start) = help.lines().position(|l| l == "Commands:") else {
        return out;
    };
    for l in help.lines().skip(start + 1) {
        if !l.starts_with("  ") {
            break;
        }
        let name = l.split_whitespace().next().unwrap().to_string();
        if name == "help" {
            continue;
        }
        let mut path = prefix.to_vec();
        path.push(name);
        out.push(path.clone());
        out.extend(subcommands(&path));
    }
    out
}

#[test]
fn the_man_page_names_every_subcommand_and_renders_without_warnings() {
    let gz = root().join("usr/share/man/man8/xen-disk-host.8.gz");
    let page = run(Command::new("gzip").arg("-dc").arg(&gz));
    let all = subcommands(&[]);
    assert!(all.len() >= 12, "{all:?}");
    for path in &all {
        let heading = format!(
            ".SS \"xen\\-disk\\-host {}\"",
            path.join(" ").replace('-', "\\-")
        );
        assert!(page.contains(&heading), "no {heading} in the man page");
    }
    assert!(page.contains("\\fB\\-\\-config\\fR \\fICONFIG\\fR"));
    let t = TempDir::new("pkg-man");
    std::fs::write(t.join("page.8"), &page).unwrap();
    let o = Command::new("groff")
        .args(["-man", "-ww", "-z"])
        .arg(t.join("page.8"))
        .output()
        .expect("run groff (package groff-base)");
    assert!(
        o.status.success() && stderr(&o).is_empty(),
        "groff: {}",
        stderr(&o)
    );
}

#[test]
fn a_build_without_the_hotplug_script_fails_and_names_it() {
    let t = TempDir::new("pkg-hotplug");
    let profile = target_dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    built();
    let missing = t.join("no-such-block-xen-disk");
    let o = Command::new("bash")
        .arg(repo().join("dist/build-deb.sh"))
        .args(["--profile", &profile, "--no-build", "--out"])
        .arg(t.join("out"))
        .env("HOTPLUG", &missing)
        .env("DEB_COMPRESS", "none")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no-such-block-xen-disk is missing"),
        "{}",
        stderr(&o)
    );
    assert!(!t.join("out").exists() || std::fs::read_dir(t.join("out")).unwrap().next().is_none());
}
