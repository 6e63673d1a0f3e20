module rapl

go 1.24

require msrwasm v0.0.0

replace msrwasm => ../../../guest-sdk/go
