//! Shell completions and manual pages of the suite's programs, made from their clap
//! definitions (`clap_complete`, `clap_mangen`): every program has a user-facing
//! `completions SHELL` command and a hidden `man DIR` one (`packaging/build-deb.sh` runs both
//! for the Debian package). Neither reads a config file.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Writes `cmd`'s completion script for `shell` to `out` (stdout for `completions SHELL`).
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Writes a manual page (section 1) for `cmd` and one for each of its visible subcommands,
/// at any depth (`mcastd.1`, `mcastd-ticket.1`, `mcastd-ticket-issue.1`, …), into `dir`
/// (created if missing). Returns the files written.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(cmd, dir, &mut written)?;
    Ok(written)
}

fn write_pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, written)?;
    }
    written.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
    Ok(())
}

/// What a program's `man DIR` command does: writes the pages and lists them on stdout; an
/// error names the directory and says what to do.
pub fn man_command(cmd: clap::Command, dir: &Path) -> Result<(), String> {
    let files = man_pages(cmd, dir).map_err(|e| {
        format!(
            "cannot write manual pages into {}: {e} (give a writable directory)",
            dir.display()
        )
    })?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// A program's `completions SHELL` or `man DIR` command.
pub enum Docs {
    Completions(Shell),
    Man(PathBuf),
}

/// Runs it for `cmd` (no config needed): the exit status, 0 or 1 with the error on stderr.
pub fn run(cmd: clap::Command, docs: &Docs) -> u8 {
    let name = cmd.get_name().to_string();
    match docs {
        Docs::Completions(shell) => {
            completions(cmd, *shell, &mut std::io::stdout().lock());
            0
        }
        Docs::Man(dir) => match man_command(cmd, dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{name}: error: {e}");
                1
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> clap::Command {
        clap::Command::new("demo")
            .about("a demo program")
            .arg(clap::Arg::new("config").long("config"))
            .subcommand(
                clap::Command::new("ticket")
                    .about("tickets")
                    .subcommand(clap::Command::new("issue").about("issue one")),
            )
            .subcommand(clap::Command::new("man").hide(true))
    }

    #[test]
    fn pages_for_every_visible_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = man_pages(demo(), &dir.path().join("man")).unwrap();
        let mut names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["demo-ticket-issue.1", "demo-ticket.1", "demo.1"]);
        let page = std::fs::read_to_string(dir.path().join("man/demo.1")).unwrap();
        assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
        assert!(page.contains("config") && page.contains("ticket"), "{page}");
        assert!(
            !page.contains("\\fBman\\fR"),
            "hidden command listed: {page}"
        );
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(demo(), shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("ticket") && text.contains("config"),
                "{shell}: {text}"
            );
        }
    }

    #[test]
    fn unwritable_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let e = man_command(demo(), &file.join("man")).unwrap_err();
        assert!(e.contains("a-file") && e.contains("writable"), "{e}");
    }
}
