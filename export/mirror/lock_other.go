//go:build !unix

package mirror

import "os"

// lockDir opens the lock file; without flock, concurrent pulls into one
// folder are not prevented on this platform.
func lockDir(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
}
