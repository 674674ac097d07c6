"""Text corpora shipped with compactmind (each folder has its LICENSE.md)."""
