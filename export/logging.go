package export

import (
	"context"
	"io"
	"log/slog"
)

// NewLogger returns a JSON logger in Cloud Logging's shape: one object per
// line with "severity" (DEBUG, INFO, WARNING, ERROR) and "message".
func NewLogger(w io.Writer, level slog.Leveler) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) > 0 {
				return a
			}
			switch a.Key {
			case slog.MessageKey:
				a.Key = "message"
			case slog.LevelKey:
				a.Key = "severity"
				switch l := a.Value.Any().(slog.Level); {
				case l >= slog.LevelError:
					a.Value = slog.StringValue("ERROR")
				case l >= slog.LevelWarn:
					a.Value = slog.StringValue("WARNING")
				case l >= slog.LevelInfo:
					a.Value = slog.StringValue("INFO")
				default:
					a.Value = slog.StringValue("DEBUG")
				}
			}
			return a
		},
	}))
}

type loggerKey struct{}

// WithLogger returns ctx carrying l.
func WithLogger(ctx context.Context, l *slog.Logger) context.Context {
	return context.WithValue(ctx, loggerKey{}, l)
}

// Logger returns the logger carried by ctx, or slog.Default.
func Logger(ctx context.Context) *slog.Logger {
	if l, ok := ctx.Value(loggerKey{}).(*slog.Logger); ok {
		return l
	}
	return slog.Default()
}
