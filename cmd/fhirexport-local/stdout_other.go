//go:build !unix

package main

import (
	"errors"
	"os"
)

// redirectStdout is not supported here: run with --logs=- to keep the
// functions' logs on stdout.
func redirectStdout(*os.File) (*os.File, func(), error) {
	return nil, nil, errors.New("not supported on this platform; use --logs=-")
}
