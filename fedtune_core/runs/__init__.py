"""Where records live and runs execute: the record store, records, backends."""
