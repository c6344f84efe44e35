module github.com/gokvm-ft/gokvm-ft

go 1.26.3

require golang.org/x/sys v0.50.0

require golang.org/x/term v0.48.0

require github.com/klauspost/compress v1.18.0

require (
	golang.org/x/exp v0.0.0-20250711185948-6ae5c78190dc // indirect
	golang.org/x/time v0.15.0 // indirect
	gvisor.dev/gvisor v0.0.0-20260905035102-160fafc42237
)
