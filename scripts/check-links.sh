#!/usr/bin/env bash
# Checks that the repository's documentation stands alone: every link and path it
# mentions points to a file inside the repository that exists. A reader who clones the
# repository has nothing beside it, so a reference outside it is a dead end.
#
# Looks at: tracked *.md files (prose and links; fenced code blocks only for the
# forbidden names below), comments in src/**/*.rs and tests/**/*.rs, `--` comments in
# schema.sql, and the text of schema/*.json.
#
# Fails (one line per problem, exit 1) on:
#   - a Markdown link whose target is absolute, leaves the repository (`../` past the
#     root) or does not exist (http(s)/mailto links and #anchors are not checked);
#   - an inline path (a word with a `/` ending in a known file extension or in `/`, or
#     starting with `./` or `../`) that leaves the repository or names no file; paths
#     are tried relative to the file, to the repository root and to src/;
#   - an absolute file path, except system locations (/etc, /var, /usr, /opt, /run,
#     /proc, /sys, /dev, /tmp, /data) that describe a deployment;
#   - any mention of the outside reference material (FORBIDDEN below: its paths
#     anywhere, its bare file names in prose and comments).
# URLs with a scheme (https://…, amqp://…) are allowed in prose and never checked.
#
# Usage: bash scripts/check-links.sh   (from anywhere; exit 0 when all is well)
set -euo pipefail
cd "$(dirname "$0")/.."

{
  git ls-files -z -- '*.md'
  git ls-files -z -- 'src/*.rs' 'src/**/*.rs' 'tests/*.rs' 'tests/**/*.rs' 'schema.sql' 'schema/*.json'
} | perl -0 -e '
use strict;
use warnings;

# The outside reference material: its paths (anywhere, code blocks included) ...
my $FORBIDDEN = qr{(?:[\w./-]*/)?shared/(?:CONTRACT\.md|MIDAS[\w.-]*)|(?:\.\./)+shared\b[\w./-]*|(?:[\w./-]*/)?midas-api/[\w.-]*};
# ... and its bare file names (in prose and comments, not in recorded program output
# inside fenced code blocks).
my $FORBIDDEN_PROSE = qr{$FORBIDDEN|(?<![\w/-])(?:CONTRACT|MIDAS|MIDAS-V2)\.md\b};
my $EXT = qr{(?:md|rs|sql|json|toml|yaml|yml|sh|service|lock|txt)};
my $SYSTEM = qr{^/(?:etc|var|usr|opt|run|proc|sys|dev|tmp|data)(?:/|$)};
my $problems = 0;
my %seen;

sub problem {
    my ($file, $line, $msg) = @_;
    my $key = "$file:$line: $msg";
    return if $seen{$key}++;
    print "$key\n";
    $problems++;
}

# Normalise a path relative to the repository root; undef when it leaves the root.
sub normalise {
    my ($path) = @_;
    my @out;
    for my $part (split m{/}, $path) {
        next if $part eq "" || $part eq ".";
        if ($part eq "..") {
            return undef unless @out;
            pop @out;
        } else {
            push @out, $part;
        }
    }
    return join("/", @out);
}

sub dir_of {
    my ($file) = @_;
    return $file =~ m{^(.*)/[^/]*$} ? $1 : "";
}

# Check one target (from a link, or an inline path). $bases: directories to try.
sub check_target {
    my ($file, $line, $target, $kind, @bases) = @_;
    $target =~ s/[#?].*$//;
    return if $target eq "";
    return if $target =~ $FORBIDDEN;   # already reported
    if ($target =~ m{^/}) {
        return if $kind eq "path" && $target =~ $SYSTEM;
        problem($file, $line, "absolute path ($kind): $target");
        return;
    }
    my $escapes = 0;
    for my $base (@bases) {
        my $joined = $base eq "" ? $target : "$base/$target";
        my $norm = normalise($joined);
        if (!defined $norm) { $escapes = 1; next; }
        my $check = $norm eq "" ? "." : $norm;
        return if -e $check;
    }
    if ($escapes && $target =~ m{^\.\./}) {
        problem($file, $line, "leaves the repository ($kind): $target");
    } else {
        problem($file, $line, "no such file ($kind): $target");
    }
}

sub check_forbidden {
    my ($file, $line, $text, $prose) = @_;
    my $re = $prose ? $FORBIDDEN_PROSE : $FORBIDDEN;
    while ($text =~ m{$re}g) {
        problem($file, $line, "points outside the repository (reference material a clone does not have): $&");
    }
}

sub check_prose {
    my ($file, $line, $text, $is_md) = @_;
    check_forbidden($file, $line, $text, 1);
    my $dir = dir_of($file);
    if ($is_md) {
        # Inline links and images: [text](target "title")
        while ($text =~ m{\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)}g) {
            my $t = $1;
            next if $t =~ m{^[a-zA-Z][a-zA-Z0-9+.-]*:} || $t =~ m{^#};
            check_target($file, $line, $t, "link", $dir);
        }
        # Reference definitions: [name]: target
        if ($text =~ m{^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)}) {
            my $t = $1;
            check_target($file, $line, $t, "link", $dir)
                unless $t =~ m{^[a-zA-Z][a-zA-Z0-9+.-]*:} || $t =~ m{^#};
        }
        $text =~ s{\]\([^)]*\)}{]}g;
    }
    # URLs with a scheme are prose, not paths.
    $text =~ s{[a-zA-Z][a-zA-Z0-9+.-]*://\S+}{ }g;
    while ($text =~ m{(?<![\w.:/\$-])((?:\.{1,2}/)*/?[\w.-]+(?:/[\w.-]+)+/?|(?:\.{1,2}/)+[\w.-]+)}g) {
        my $t = $1;
        $t =~ s{\.+$}{};   # a full stop ending the sentence
        my $candidate =
               $t =~ m{^\.{1,2}/}
            || $t =~ m{\.$EXT$}
            || ($t =~ m{/$} && $t !~ m{^/});
        next unless $candidate;
        next if $t =~ m{^(?:\./)?target/};   # build output, made by cargo
        check_target($file, $line, $t, "path", $dir, "", "src");
    }
}

my @files = split /\0/, do { local $/; <STDIN> };
$/ = "\n";
for my $file (@files) {
    next unless -f $file;
    open(my $fh, "<", $file) or do { problem($file, 0, "cannot read: $!"); next };
    my $is_md = $file =~ /\.md$/;
    my $is_rs = $file =~ /\.rs$/;
    my $is_sql = $file =~ /\.sql$/;
    my $fence;
    my $n = 0;
    while (my $l = <$fh>) {
        $n++;
        chomp $l;
        if ($is_md) {
            if ($l =~ m{^\s{0,3}(```+|~~~+)}) {
                my $mark = substr($1, 0, 3);
                if (!defined $fence) { $fence = $mark; }
                elsif ($mark eq $fence) { undef $fence; }
                check_forbidden($file, $n, $l);
                next;
            }
            if (defined $fence) { check_forbidden($file, $n, $l); next; }
            check_prose($file, $n, $l, 1);
        } elsif ($is_rs) {
            my $c;
            if ($l =~ m{^\s*//(.*)$}) { $c = $1; }
            elsif ($l =~ m{\s//\s(.*)$}) { $c = $1; }
            next unless defined $c;
            check_prose($file, $n, $c, 0);
        } elsif ($is_sql) {
            my $c;
            if ($l =~ m{^\s*--(.*)$}) { $c = $1; }
            elsif ($l =~ m{\s--\s(.*)$}) { $c = $1; }
            next unless defined $c;
            check_prose($file, $n, $c, 0);
        } else {
            check_prose($file, $n, $l, 0);
        }
    }
    close $fh;
}
if ($problems) {
    print STDERR "check-links: $problems problem(s): documentation must stand alone (links and paths inside the repository, to files that exist)\n";
    exit 1;
}
print "check-links: ok (" . scalar(@files) . " files)\n";
'
