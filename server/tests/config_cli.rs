//! `infergate config check` and `infergate config defaults`, through the built binary:
//! the defaults it prints are the code's defaults and pass the check, the examples it
//! prints commented out pass it too once uncommented, every field of every table is
//! shown (so a new field cannot be left out), and a broken file exits 1 naming the
//! field's whole path.

use infergate::config::Config;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn infergate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(args)
        .env_remove("INFERGATE_ADMIN_TOKEN")
        .output()
        .expect("run infergate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn defaults() -> String {
    let out = infergate(&["config", "defaults"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Uncomments the settings and examples (`# key = value`, `# [table]`), not the prose.
fn uncommented(defaults: &str) -> String {
    defaults
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_setting(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_setting(line: &str) -> bool {
    line.starts_with('[')
        || line.split_once(" = ").is_some_and(|(key, _)| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-\"".contains(c))
        })
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "infergate-config-cli-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write");
    path
}

fn check(path: &Path) -> Output {
    infergate(&["config", "check", path.to_str().expect("utf-8 path")])
}

#[test]
fn defaults_are_the_code_defaults_and_pass_the_check() {
    let printed = defaults();
    // What is printed, read back, is exactly Config::default().
    let parsed = Config::parse(&printed, "defaults").expect("defaults parse");
    assert_eq!(parsed, Config::default());

    let dir = scratch("defaults");
    let out = check(&write(&dir, "defaults.toml", &printed));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(summary.contains("valid"), "{summary}");
    assert!(summary.contains("127.0.0.1:8001"), "{summary}");
    assert!(summary.contains("gpu_aware"), "{summary}");

    // Every top-level section is introduced by its one-line description.
    let lines: Vec<&str> = printed.lines().collect();
    let mut sections = 0;
    for (i, line) in lines.iter().enumerate() {
        let bare = line.trim_start_matches("# ");
        let top = bare.starts_with('[') && !bare.trim_matches(['[', ']']).contains('.');
        if top {
            sections += 1;
            let above = lines[i - 1];
            assert!(
                above.starts_with("# ") && !is_setting(&above[2..]),
                "{line} has no description above it"
            );
        }
    }
    assert!(sections >= 15, "{sections} sections");
}

#[test]
fn the_commented_examples_are_valid_and_show_every_field() {
    let full = uncommented(&defaults());
    let dir = scratch("examples");
    let out = check(&write(&dir, "full.toml", &full));
    assert_eq!(out.status.code(), Some(0), "{}\n{full}", text(&out.stderr));
    let summary = text(&out.stdout);
    for what in ["backends   1", "dns        1", "models     1", "token set"] {
        assert!(summary.contains(what), "{what}: {summary}");
    }

    // Every field the parser knows, in every table, is in the file: probe each table
    // with an unknown field and compare with the parser's list of the expected ones.
    let document: toml::Table = full.parse().expect("toml");
    let lines: Vec<&str> = full.lines().collect();
    let headers: Vec<(usize, String)> = std::iter::once((0, String::new()))
        .chain(
            lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.starts_with('['))
                .map(|(i, l)| (i + 1, l.trim_matches(['[', ']']).to_owned())),
        )
        .collect();
    let mut probed = 0;
    for (at, header) in headers {
        let mut probe = lines.clone();
        probe.insert(at, "zz_probe = 1");
        let err = match Config::parse(&probe.join("\n"), "probe") {
            Err(err) => err,
            // A free-form table whose values are numbers takes the probe as a key.
            Ok(_) if header == "tenants.weights" => continue,
            Ok(_) => panic!("{header}: a probe field was accepted"),
        };
        let expected: Vec<&str> = match err.reason.split_once("expected") {
            Some((_, list)) => list.split('`').skip(1).step_by(2).collect(),
            // A free-form table (tenants.api_keys, rate_limit.tenants) takes any key.
            None => continue,
        };
        let mut table = &document;
        for part in header.split('.').filter(|p| !p.is_empty()) {
            table = match &table[part] {
                toml::Value::Table(t) => t,
                toml::Value::Array(items) => items[0].as_table().expect("a table"),
                other => panic!("{header}: {other:?}"),
            };
        }
        for field in expected {
            assert!(
                table.contains_key(field),
                "[{header}] {field} is not in `config defaults`"
            );
        }
        probed += 1;
    }
    assert!(probed > 20, "only {probed} tables probed");
}

#[test]
fn a_broken_file_exits_1_naming_the_field() {
    let dir = scratch("broken");
    for (name, contents, field) in [
        (
            "unknown",
            "[balancer]\npolcy = \"gpu_aware\"\n",
            "balancer.polcy",
        ),
        (
            "type",
            "[[backends]]\naddress = \"a:8001\"\nweight = \"two\"\n",
            "backends[0].weight",
        ),
        ("value", "[health]\ninterval_ms = 0\n", "health.interval_ms"),
        (
            "model",
            "[models.simple.bulkhead]\nmax_queue = \"x\"\n",
            "models.simple.bulkhead.max_queue",
        ),
        (
            "open-admin",
            "admin_listen = \"0.0.0.0:8003\"\n",
            "admin_listen",
        ),
        ("syntax", "[balancer\n", ""),
    ] {
        let out = check(&write(&dir, &format!("{name}.toml"), contents));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(out.stdout.is_empty(), "{name}: no summary for a bad file");
        assert!(
            field.is_empty() || stderr.contains(&format!("field `{field}`")),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(&format!("{name}.toml")), "{name}: {stderr}");
    }
    let out = check(&dir.join("missing.toml"));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read"));
}
