//! The configuration file below the command line, and the generated shell
//! completions and manual page.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use support::{esgz_bin, fixture_dir};

fn export(config: &Path, home: &Path, extra: &[&str]) -> Output {
    let image = format!("oci:{}:latest", fixture_dir("links").join("oci").display());
    Command::new(esgz_bin())
        .args(["export", &image, "-o"])
        .arg(home.join("disk.img"))
        .arg("--config")
        .arg(config)
        .args(extra)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("ESGZ_NBD_CACHE_DIR")
        .output()
        .expect("running export")
}

fn has_cache(dir: &Path) -> bool {
    fs::read_dir(dir.join("layers")).is_ok_and(|mut entries| entries.next().is_some())
}

#[test]
fn config_file_sets_defaults_and_cli_wins() {
    let home = tempfile::tempdir().expect("temp dir");
    let from_file = home.path().join("cache-from-file");
    let from_cli = home.path().join("cache-from-cli");
    let config = home.path().join("config.toml");
    fs::write(
        &config,
        format!("cache_dir = \"{}\"\nio = \"std\"\n", from_file.display()),
    )
    .expect("writing the config");

    let output = export(&config, home.path(), &["-v"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        has_cache(&from_file),
        "the file's cache_dir was not used:\n{stderr}"
    );

    let output = export(
        &config,
        home.path(),
        &["--cache-dir", from_cli.to_str().expect("UTF-8")],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        has_cache(&from_cli),
        "--cache-dir did not win over the file"
    );
}

#[test]
fn config_verify_false_warns() {
    let home = tempfile::tempdir().expect("temp dir");
    let config = home.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "verify = false\ncache_dir = \"{}\"\n",
            home.path().join("c").display()
        ),
    )
    .expect("writing the config");
    let output = export(&config, home.path(), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("digests are not checked"), "{stderr}");
}

#[test]
fn config_errors_name_the_file() {
    let home = tempfile::tempdir().expect("temp dir");
    let cases = [
        (
            "typo.toml",
            Some("cache_directory = \"/x\"\n"),
            "cache_directory",
        ),
        ("bad.toml", Some("io = \"mmap\"\n"), "mmap"),
        ("absent.toml", None, "failed to read the configuration file"),
    ];
    for (name, text, expected) in cases {
        let config = home.path().join(name);
        if let Some(text) = text {
            fs::write(&config, text).expect("writing the config");
        }
        let output = export(&config, home.path(), &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
}

#[test]
fn default_config_from_xdg_dir() {
    let home = tempfile::tempdir().expect("temp dir");
    let xdg = home.path().join("xdg");
    fs::create_dir_all(xdg.join("esgz-nbd")).expect("mkdir");
    let cache = home.path().join("xdg-cache");
    fs::write(
        xdg.join("esgz-nbd/config.toml"),
        format!("cache_dir = \"{}\"\n", cache.display()),
    )
    .expect("writing the config");
    let image = format!("oci:{}:latest", fixture_dir("links").join("oci").display());
    let output = Command::new(esgz_bin())
        .args(["export", &image, "-o"])
        .arg(home.path().join("disk.img"))
        .env("XDG_CONFIG_HOME", &xdg)
        .env_remove("ESGZ_NBD_CONFIG")
        .env_remove("ESGZ_NBD_CACHE_DIR")
        .output()
        .expect("running export");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(has_cache(&cache), "the XDG config file was not read");
}

#[test]
fn completions_are_valid_scripts() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(esgz_bin())
            .args(["completions", shell])
            .output()
            .expect("running completions");
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8(output.stdout).expect("UTF-8 script");
        for word in ["inspect", "serve", "export", "metrics-addr", "hosts-dir"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
        if shell == "bash" {
            let file = tempfile::NamedTempFile::new().expect("temp file");
            fs::write(file.path(), &script).expect("writing the script");
            support::run(Command::new("bash").arg("-n").arg(file.path()));
        }
    }
}

#[test]
fn man_page_is_roff() {
    let output = Command::new(esgz_bin())
        .arg("man")
        .output()
        .expect("running man");
    assert!(output.status.success());
    let page = String::from_utf8(output.stdout).expect("UTF-8 page");
    assert!(page.contains(".TH esgz-nbd 1"), "{page}");
    for word in ["inspect", "completions", "\\-\\-config"] {
        assert!(page.contains(word), "no {word} in the page");
    }
}

#[test]
fn man_pages_per_command() {
    let output = Command::new(esgz_bin())
        .args(["man", "serve"])
        .output()
        .expect("running man serve");
    assert!(output.status.success());
    let page = String::from_utf8(output.stdout).expect("UTF-8 page");
    assert!(page.contains(".TH esgz-nbd-serve 1"), "{page}");
    assert!(
        page.contains("\\-\\-record\\-access"),
        "serve options missing: {page}"
    );

    let unknown = Command::new(esgz_bin())
        .args(["man", "cache", "nope"])
        .output()
        .expect("running man cache nope");
    assert!(!unknown.status.success());
    let message = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        message.contains("prune"),
        "the error lists no commands: {message}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let status = Command::new(esgz_bin())
        .args(["man", "--out-dir"])
        .arg(dir.path())
        .status()
        .expect("running man --out-dir");
    assert!(status.success());
    for name in ["esgz-nbd.1", "esgz-nbd-serve.1", "esgz-nbd-cache-prune.1"] {
        let page = std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert!(page.starts_with(".ie"), "{name} is not roff");
    }
}
