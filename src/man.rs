//! Manual pages (roff) for the command line: the top-level page and one page per
//! command, named as man(1) expects for nested commands (`esgz-nbd-cache-prune`).

use std::path::Path;

use anyhow::{bail, Context};

/// Renders the page of the command at `path` below `root` (such as `["cache",
/// "prune"]`), or the top-level page when `path` is empty.
pub fn render_page(mut root: clap::Command, path: &[String]) -> anyhow::Result<Vec<u8>> {
    root.build();
    let page_name = join_words(root.get_name(), path, "-");
    let mut command = root.clone();
    for (depth, word) in path.iter().enumerate() {
        let Some(sub) = command.find_subcommand(word) else {
            let parent = join_words(root.get_name(), &path[..depth], " ");
            let known: Vec<&str> = command
                .get_subcommands()
                .map(|sub| sub.get_name())
                .filter(|name| *name != "help")
                .collect();
            bail!(
                "{parent} has no command {word:?}; its commands are: {}",
                known.join(", ")
            );
        };
        command = sub.clone();
    }
    render(command, &page_name, root.get_version())
}

/// Writes the top-level page and the page of every command below it to `dir`, one
/// `NAME.1` file each; returns the number of pages written.
pub fn write_pages(mut root: clap::Command, dir: &Path) -> anyhow::Result<usize> {
    root.build();
    std::fs::create_dir_all(dir)
        .with_context(|| format!("failed to create the folder {}", dir.display()))?;
    let version = root.get_version().map(str::to_string);
    let mut pending = vec![(Vec::<String>::new(), root.clone())];
    let mut written = 0;
    while let Some((path, command)) = pending.pop() {
        for sub in command
            .get_subcommands()
            .filter(|sub| sub.get_name() != "help")
        {
            let mut sub_path = path.clone();
            sub_path.push(sub.get_name().to_string());
            pending.push((sub_path, sub.clone()));
        }
        let name = join_words(root.get_name(), &path, "-");
        let page = render(command, &name, version.as_deref())?;
        let file = dir.join(format!("{name}.1"));
        std::fs::write(&file, page)
            .with_context(|| format!("failed to write the manual page {}", file.display()))?;
        written += 1;
    }
    Ok(written)
}

fn render(command: clap::Command, name: &str, version: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let mut command = command.name(name.to_string());
    if let Some(version) = version {
        command = command.version(version.to_string());
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut page)
        .with_context(|| format!("failed to render the manual page {name}(1)"))?;
    Ok(page)
}

/// Joins the root and the command words with `separator`: hyphens give the page
/// name (`esgz-nbd-serve`), spaces the command as typed (`esgz-nbd serve`).
fn join_words(root: &str, path: &[String], separator: &str) -> String {
    std::iter::once(root)
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(separator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("tool")
            .version("1.2.3")
            .subcommand(
                clap::Command::new("serve")
                    .about("Serve an image.")
                    .arg(clap::Arg::new("socket").long("socket").help("Socket path.")),
            )
            .subcommand(
                clap::Command::new("cache")
                    .about("Manage the cache.")
                    .subcommand(clap::Command::new("prune").about("Remove old layers.")),
            )
    }

    #[test]
    fn subcommand_page_has_options() {
        let page = String::from_utf8(render_page(sample(), &["serve".into()]).expect("page"))
            .expect("utf-8");
        assert!(page.contains(".TH tool-serve 1"), "{page}");
        assert!(page.contains("\\-\\-socket"), "{page}");
        assert!(page.contains("tool serve"), "synopsis: {page}");
    }

    #[test]
    fn unknown_command_lists_known() {
        let error =
            render_page(sample(), &["cache".into(), "list".into()]).expect_err("no such command");
        let message = format!("{error:#}");
        assert!(
            message.contains("tool cache has no command \"list\""),
            "{message}"
        );
        assert!(message.contains("prune"), "{message}");
    }

    #[test]
    fn every_page_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(write_pages(sample(), dir.path()).expect("pages"), 4);
        for name in [
            "tool.1",
            "tool-serve.1",
            "tool-cache.1",
            "tool-cache-prune.1",
        ] {
            assert!(dir.path().join(name).is_file(), "{name} missing");
        }
    }
}
