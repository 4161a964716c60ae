//! The import over fixture vhosts built with the inventory's typed builders.
