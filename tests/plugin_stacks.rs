//! Filters over bases, built by the host from `-c base=…` and tested through real `.so` files.

mod common;
use common::*;

#[test]
fn a_filter_over_a_base_is_checked_as_one_disk() {
    let o = host(&[
        "check",
        "test-window",
        "-c",
        "skip=1M",
        "-c",
        "base=discard",
        "-c",
        "base.size=64M",
        "--no-data",
        "--destructive",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    // The stack is named top first, and the window hides 1 MiB of the 64 MiB base.
    assert!(
        out.contains("test-window 0.0.0 over discard 0.1.0: 66060288 bytes"),
        "{out}"
    );
}

#[test]
fn filters_stack_and_the_toml_form_matches() {
    let o = host(&[
        "check",
        "test-window",
        "-c",
        "base=test-window",
        "-c",
        "base.base=discard",
        "-c",
        "base.base.size=8M",
        "--no-data",
        "--destructive",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o)
            .contains("test-window 0.0.0 over test-window 0.0.0 over discard 0.1.0: 6291456 bytes"),
        "{}",
        stdout(&o)
    );
    let t = TempDir::new("stack");
    let f = t.join("stack.toml");
    std::fs::write(&f, "[plugin-config]\nskip = \"2M\"\n[plugin-config.base]\nplugin = \"discard\"\nsize = \"8M\"\n").unwrap();
    let o = host(&[
        "check",
        "test-window",
        "--no-data",
        "--destructive",
        "--config-file",
        f.to_str().unwrap(),
    ]);
    assert!(
        stdout(&o).contains("over discard 0.1.0: 6291456 bytes"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn stack_mistakes_are_one_line() {
    assert_bad_input(
        &host(&["check", "test-window"]),
        &["test-window", "is a filter", "base="],
    );
    assert_bad_input(
        &host(&["check", "discard", "-c", "base=discard"]),
        &["not a filter"],
    );
    assert_bad_input(
        &host(&["check", "test-window", "-c", "base.size=1M"]),
        &["name the base plugin"],
    );
    assert_bad_input(
        &host(&["check", "test-window", "-c", "base=nope"]),
        &["libnope.so"],
    );
    // The base's own config errors name the base's keys.
    assert_bad_input(
        &host(&[
            "check",
            "test-window",
            "-c",
            "base=discard",
            "-c",
            "base.sise=1",
        ]),
        &["`sise`"],
    );
    // The filter refuses a window larger than its base.
    assert_bad_input(
        &host(&[
            "check",
            "test-window",
            "-c",
            "skip=2G",
            "-c",
            "base=discard",
        ]),
        &["`skip`"],
    );
    // A stack deeper than the limit is refused, not followed forever.
    let mut args = vec!["check", "test-window"];
    let keys: Vec<String> = (1..=9)
        .map(|d| format!("{}=test-window", vec!["base"; d].join(".")))
        .collect();
    for k in &keys {
        args.extend(["-c", k.as_str()]);
    }
    assert_bad_input(&host(&args), &["more than 8 layers"]);
}
