//! The `xen-disk-host` command. Parsing lives in [`xen_disk_host::cli`]; this file only runs
//! it and turns an error into one line on stderr and exit code 2.

fn main() {
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`)
    // instead of panicking on EPIPE.
    // SAFETY: setting a signal disposition to the default before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match xen_disk_host::cli::main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the error and its causes, joined; multi-line messages (from parsers)
            // folded.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let line: Vec<&str> = chain
                .iter()
                .flat_map(|c| c.lines())
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("xen-disk-host: error: {}", line.join("; "));
            std::process::exit(2);
        }
    }
}
