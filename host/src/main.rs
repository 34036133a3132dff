//! The `xen-disk-host` command. Parsing lives in [`xen_disk_host::cli`]; this file only runs
//! it and turns an error into one line on stderr and exit code 2.

fn main() {
    match xen_disk_host::cli::main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the error and its causes, joined.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("xen-disk-host: error: {}", chain.join(": "));
            std::process::exit(2);
        }
    }
}
