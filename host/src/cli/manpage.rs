//! `xen-disk-host manpage` (hidden): the manual page, in roff, written from the clap command
//! line itself, so the page the package installs always matches the binary it ships with.
//! Every visible subcommand gets a section with its synopsis, its description and each of
//! its options; FILES, ENVIRONMENT and EXIT STATUS say what the parser cannot know.

use clap::{Arg, ArgAction, Command};
use std::fmt::Write;

/// The page's section: administration commands and daemons.
pub const SECTION: &str = "8";

/// The whole page for `cmd` (the top-level command, as `Cli::command()` builds it).
pub fn render(cmd: &Command) -> String {
    let mut cmd = cmd.clone();
    // Fills in what clap derives at parse time (version, propagated settings).
    cmd.build();
    let name = cmd.get_name().to_string();
    let mut out = String::new();
    let version = cmd.get_version().unwrap_or("");
    let _ = writeln!(
        out,
        ".TH {} {SECTION} \"\" \"{} {}\" \"System Administration\"",
        roff_text(&name.to_uppercase()),
        roff_text(&name),
        roff_text(version)
    );
    out.push_str(".SH NAME\n");
    let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
    let _ = writeln!(out, "{} \\- {}", roff_text(&name), roff_text(&about));
    out.push_str(".SH SYNOPSIS\n");
    for sub in visible_subcommands(&cmd) {
        let _ = writeln!(out, ".B {} {}", roff_text(&name), roff_text(sub.get_name()));
        let _ = writeln!(out, "{}\n.br", synopsis_tail(sub));
    }
    out.push_str(".SH DESCRIPTION\n");
    out.push_str(&paragraphs(
        "xen-disk-host serves virtual disks to Xen guests' blkfront drivers from dom0 or a \
         driver domain. Each disk is a plugin (a shared object loaded through a stable ABI). \
         The daemon, serve, is normally run by the xen-disk service \
         (systemctl start xen-disk) with /etc/xen-disk/disks.toml; systemctl reload makes it \
         read the file again.",
    ));
    out.push_str(".SH COMMANDS\n");
    for sub in visible_subcommands(&cmd) {
        command_section(&mut out, sub, &[&name]);
    }
    out.push_str(FIXED_SECTIONS);
    out
}

/// FILES, ENVIRONMENT, EXIT STATUS: facts of the program outside its parser.
const FIXED_SECTIONS: &str = r#".SH FILES
.TP
.I /etc/xen\-disk/disks.toml
The disks serve attaches, one [[disk]] table each (domain, plugin, plugin\-config; see the
commented example the package installs). Read again on SIGHUP.
.TP
.I /usr/lib/xen\-disk/plugins/
The plugins: lib\fINAME\fR.so answers to the plugin name \fINAME\fR (a \- in the name is
spelt _ in the file).
.TP
.I /run/xen\-disk/serve.sock
The control socket of serve, for ctl (mode 0600).
.TP
.I /etc/xen/scripts/block\-xen\-disk
The hotplug script an xl disk spec names with script=, for devices libxl creates under
backend/vbd3.
.SH ENVIRONMENT
.TP
.B XEN_DISK_PLUGIN_PATH
Directories (colon\-separated) searched for plugins before the binary's own directory,
the plugin directory of its installation prefix and /usr/lib/xen\-disk/plugins.
.TP
.B XEN_DISK_LOG
What is logged to standard error (e.g. info, debug, xen_disk_host=trace); warn by default.
.TP
.B XEN_DISK_OPEN_TIMEOUT
Seconds a plugin may take to open for a swap or reload (60 by default).
.TP
.B XEN_DISK_LATENCY_SAMPLE
Time the latency of one request in N (1: every request). By default every request is
timed, unless the clocksource is one the vDSO cannot read, so that reading the clock is a
system call (xen, which a PV dom0 ends up on; hpet), where one in 16 is.
.TP
.B XENSTORED_PATH
The xenstored socket to use instead of /run/xenstored/socket or /dev/xen/xenbus.
.SH SIGNALS
serve: SIGHUP reads the configuration again; SIGTERM or SIGINT asks every device to close
and waits for the guests to let go; a second one forces the guests' sides closed.
.SH EXIT STATUS
0 on success; 2 for bad input (a missing file, an unknown plugin or key, a malformed
configuration), with one error line naming it; 1 when check or bench found failures.
"#;

/// The subcommands a user sees (not `help`, not hidden ones such as this page's own).
fn visible_subcommands(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

/// One command's section, then its subcommands' ones.
fn command_section(out: &mut String, cmd: &Command, parents: &[&str]) {
    let mut path: Vec<&str> = parents.to_vec();
    path.push(cmd.get_name());
    let _ = writeln!(out, ".SS \"{}\"", roff_text(&path.join(" ")));
    let _ = writeln!(
        out,
        ".B {}\n{}",
        roff_text(&path.join(" ")),
        synopsis_tail(cmd)
    );
    let about = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(|a| a.to_string())
        .unwrap_or_default();
    if !about.is_empty() {
        out.push_str(".PP\n");
        out.push_str(&paragraphs(&about));
    }
    for arg in visible_args(cmd) {
        let _ = writeln!(out, ".TP\n{}", arg_label(arg));
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let mut text = help.trim_end().to_string();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if !defaults.is_empty() && takes_value(arg) && !text.contains("default") {
            let _ = write!(text, " (default: {})", defaults.join(", "));
        }
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|p| !p.is_hide_set())
            .map(|p| p.get_name().to_string())
            .collect();
        if !possible.is_empty() && takes_value(arg) {
            if !text.is_empty() && !text.ends_with('.') {
                text.push('.');
            }
            let _ = write!(text, " One of: {}.", possible.join(", "));
        }
        out.push_str(&paragraphs_indented(&text));
    }
    for sub in visible_subcommands(cmd) {
        command_section(out, sub, &path);
    }
}

/// Arguments shown: not hidden, not clap's own --help/--version.
fn visible_args(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| {
        !a.is_hide_set()
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    })
}

fn takes_value(arg: &Arg) -> bool {
    arg.get_action().takes_values()
}

/// The value's name(s) as the user types them: `FILE`, `KEY=VALUE`.
fn value_name(arg: &Arg) -> String {
    match arg.get_value_names() {
        Some(names) if !names.is_empty() => names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        _ => arg.get_id().as_str().to_uppercase(),
    }
}

/// Whether the value may be left out (`--flag` or `--flag=VALUE`).
fn value_optional(arg: &Arg) -> bool {
    arg.get_num_args().is_some_and(|r| r.min_values() == 0)
}

/// `--long VALUE` / `-s, --long VALUE` / `VALUE` in roff, for a `.TP` label.
fn arg_label(arg: &Arg) -> String {
    if arg.is_positional() {
        return format!("\\fI{}\\fR", roff_text(&value_name(arg)));
    }
    let mut names = Vec::new();
    if let Some(s) = arg.get_short() {
        names.push(format!("\\fB\\-{}\\fR", roff_text(&s.to_string())));
    }
    if let Some(l) = arg.get_long() {
        names.push(format!("\\fB\\-\\-{}\\fR", roff_text(l)));
    }
    let mut label = names.join(", ");
    if takes_value(arg) {
        let v = roff_text(&value_name(arg));
        if value_optional(arg) {
            let _ = write!(label, "[=\\fI{v}\\fR]");
        } else if arg.is_require_equals_set() {
            let _ = write!(label, "=\\fI{v}\\fR");
        } else {
            let _ = write!(label, " \\fI{v}\\fR");
        }
    }
    label
}

/// The words after the command's name in a synopsis: options in brackets unless required,
/// then the positional arguments, then `COMMAND` when it has subcommands.
fn synopsis_tail(cmd: &Command) -> String {
    let mut words = Vec::new();
    let word = |arg: &Arg| -> String {
        let label = if arg.is_positional() {
            format!("\\fI{}\\fR", roff_text(&value_name(arg)))
        } else {
            let flag = match (arg.get_long(), arg.get_short()) {
                (Some(l), _) => format!("\\fB\\-\\-{}\\fR", roff_text(l)),
                (None, Some(s)) => format!("\\fB\\-{}\\fR", roff_text(&s.to_string())),
                (None, None) => String::new(),
            };
            if !takes_value(arg) {
                flag
            } else if value_optional(arg) {
                format!("{flag}[=\\fI{}\\fR]", roff_text(&value_name(arg)))
            } else {
                format!("{flag} \\fI{}\\fR", roff_text(&value_name(arg)))
            }
        };
        let repeats = matches!(arg.get_action(), ArgAction::Append | ArgAction::Count);
        let label = if repeats {
            format!("{label}...")
        } else {
            label
        };
        if arg.is_required_set() {
            label
        } else {
            format!("[{label}]")
        }
    };
    for arg in visible_args(cmd).filter(|a| !a.is_positional()) {
        words.push(word(arg));
    }
    for arg in visible_args(cmd).filter(|a| a.is_positional()) {
        words.push(word(arg));
    }
    if visible_subcommands(cmd).next().is_some() {
        let inner: Vec<String> = visible_subcommands(cmd)
            .map(|s| format!("\\fB{}\\fR", roff_text(s.get_name())))
            .collect();
        let braces = if cmd.is_subcommand_required_set() {
            ("{", "}")
        } else {
            ("[", "]")
        };
        words.push(format!("{}{}{} ...", braces.0, inner.join(" | "), braces.1));
    }
    words.join(" ")
}

/// Text safe for roff: backslashes escaped, minus signs kept as such, and no line starting
/// with a control character.
fn roff_text(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

/// Paragraphs (blank-line separated, lines within joined) as roff, each after `.PP`
/// except the first.
fn paragraphs(text: &str) -> String {
    join_paragraphs(text, ".PP")
}

/// The same inside a `.TP` item: later paragraphs stay indented.
fn paragraphs_indented(text: &str) -> String {
    join_paragraphs(text, ".IP")
}

fn join_paragraphs(text: &str, separator: &str) -> String {
    let mut out = String::new();
    for (i, para) in text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        if i > 0 {
            out.push_str(separator);
            out.push('\n');
        }
        let line = para.split_whitespace().collect::<Vec<_>>().join(" ");
        let line = line.replace('\\', "\\e");
        // A line starting with . or ' would be read as a request.
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn page() -> String {
        render(&crate::cli::Cli::command())
    }

    #[test]
    fn every_visible_subcommand_has_a_section_and_the_hidden_ones_none() {
        let page = page();
        let cmd = crate::cli::Cli::command();
        let mut names = Vec::new();
        for sub in visible_subcommands(&cmd) {
            names.push(format!("xen\\-disk\\-host {}", roff_text(sub.get_name())));
            for inner in visible_subcommands(sub) {
                names.push(format!(
                    "xen\\-disk\\-host {} {}",
                    roff_text(sub.get_name()),
                    roff_text(inner.get_name())
                ));
            }
        }
        assert!(names.len() >= 12, "{names:?}");
        for n in &names {
            assert!(page.contains(&format!(".SS \"{n}\"\n")), "no section {n}");
        }
        assert!(!page.contains("manpage"), "the hidden command is listed");
        assert!(page.starts_with(".TH XEN\\-DISK\\-HOST 8 "));
    }

    #[test]
    fn options_show_their_values_and_defaults() {
        let page = page();
        assert!(
            page.contains("\\fB\\-\\-config\\fR \\fICONFIG\\fR"),
            "serve --config"
        );
        assert!(page.contains("\\fB\\-c\\fR, \\fB\\-\\-config\\fR \\fIKEY=VALUE\\fR"));
        assert!(page.contains("\\fB\\-\\-answer\\-on\\-completion\\fR[=\\fI"));
        assert!(page.contains("(default: 2)"), "serve --workers");
    }

    #[test]
    fn roff_requests_cannot_come_from_help_text() {
        assert_eq!(paragraphs(".x and 'y"), "\\&.x and 'y\n");
        assert_eq!(paragraphs("a\nb\n\n'c"), "a b\n.PP\n\\&'c\n");
        assert_eq!(roff_text("a\\b-c"), "a\\eb\\-c");
    }
}
