//! The README's snippets, compiled against the README's install lines alone.

#[path = "../../../tests/readme.rs"]
mod readme;

fn main() {}
