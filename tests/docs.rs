//! The CRM API facts the code relies on are in the repository: every `crm-apis.md §N`
//! the sources cite is a section of `docs/crm-apis.md`, and nothing cites a file outside
//! the repository.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The section numbers cited after each `crm-apis.md` in `text` (`§2.4, §2.8` gives both).
fn citations(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crm-apis.md") {
        let tail: String = text[i..].chars().take(60).collect();
        let mut rest = tail.as_str();
        while let Some(at) = rest.find('§') {
            let number: String = rest[at + '§'.len_utf8()..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.').to_string();
            if !number.is_empty() {
                out.push(number);
            }
            rest = &rest[at + '§'.len_utf8()..];
        }
    }
    out
}

#[test]
fn every_cited_crm_api_section_is_in_docs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/crm-apis.md")).unwrap();
    let headings: Vec<&str> = doc.lines().filter(|l| l.starts_with('#')).collect();
    let mut files = Vec::new();
    for dir in ["src", "tests", "load-tests"] {
        sources(&root.join(dir), &mut files);
    }
    let mut cited = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains(&["shared", "/crm-apis.md"].concat()),
            "{} cites a file outside the repository",
            file.display()
        );
        for number in citations(&text) {
            cited += 1;
            let found = headings.iter().any(|h| {
                let title = h.trim_start_matches('#').trim_start();
                title.starts_with(&format!("{number} ")) || title.starts_with(&format!("{number}. "))
            });
            assert!(
                found,
                "{} cites docs/crm-apis.md §{number}, which has no such section",
                file.display()
            );
        }
    }
    assert!(cited > 10, "only {cited} citations found: the scan is broken");
}
