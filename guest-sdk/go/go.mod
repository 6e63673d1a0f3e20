module msrwasm

go 1.24
