//go:build unix

package main

import (
	"os"

	"golang.org/x/sys/unix"
)

// redirectStdout points file descriptor 1 at f, so everything the process
// writes to its stdout (the functions' logger holds os.Stdout from package
// init) lands in f. It returns a file for the original stdout and a function
// that puts it back.
func redirectStdout(f *os.File) (orig *os.File, restore func(), err error) {
	saved, err := unix.Dup(1)
	if err != nil {
		return nil, nil, err
	}
	unix.CloseOnExec(saved)
	if err := unix.Dup2(int(f.Fd()), 1); err != nil {
		unix.Close(saved)
		return nil, nil, err
	}
	orig = os.NewFile(uintptr(saved), "/dev/stdout")
	return orig, func() {
		unix.Dup2(saved, 1)
		orig.Close()
	}, nil
}
