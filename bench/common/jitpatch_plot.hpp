// Line plots for benchmarks with a natural x axis (thread count, batch size, N): one SVG
// per figure, drawn by gnuplot (Debian's gnuplot-nox, which tools/bootstrap installs for
// the benchmarks only).
//
//   jitpatch::bench::Plot p("patch cost vs threads", "threads", "median per patch (us)");
//   p.logx = p.logy = true;
//   p.series("jitpatch", {{1, 12.5}, {2, 13.0}, ...});
//   std::string err;
//   if (!p.write_svg("out/patch.svg", &err)) fprintf(stderr, "%s\n", err.c_str());
//
// The data travel inline in the script (a gnuplot datablock), so nothing is left behind
// but the SVG. Points whose y is not finite (a case that failed) are left out. Header-only
// like jitpatch_bench.hpp; a benchmark without --plot never runs gnuplot.
#pragma once

#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace jitpatch::bench {

class Plot {
 public:
  Plot(std::string title, std::string xlabel, std::string ylabel)
      : title_(std::move(title)), xlabel_(std::move(xlabel)), ylabel_(std::move(ylabel)) {}

  bool logx = false;
  bool logy = false;
  int width = 820, height = 500;
  std::string subtitle;  // second title line: date, machine, load

  Plot& series(std::string name, std::vector<std::pair<double, double>> points, bool dashed = false) {
    series_.push_back({std::move(name), std::move(points), dashed});
    return *this;
  }

  // Runs `gnuplot` (found on PATH). False with a reason in *err when gnuplot is missing,
  // fails, or there is nothing to draw.
  bool write_svg(const std::string& path, std::string* err) const {
    std::string script = "set terminal svg size " + std::to_string(width) + "," + std::to_string(height) +
                         " noenhanced font 'sans,11' background rgb 'white'\n";
    script += "set output " + quote(path) + "\n";
    script += "set title " + quote(subtitle.empty() ? title_ : title_ + "\\n" + subtitle) + "\n";
    script += "set xlabel " + quote(xlabel_) + "\nset ylabel " + quote(ylabel_) + "\n";
    script += "set key outside right top vertical\nset grid\nset border 3\nset tics nomirror\n";
    if (logx) script += "set logscale x 2\n";
    if (logy) script += "set logscale y 10\n";
    // Whole-number x ticks at the data's x values: thread counts read better than 2^k.
    std::vector<double> xs;
    for (const auto& s : series_)
      for (const auto& p : s.points)
        if (std::find_if(xs.begin(), xs.end(), [&](double x) { return x == p.first; }) == xs.end()) xs.push_back(p.first);
    if (!xs.empty() && xs.size() <= 16) {
      std::sort(xs.begin(), xs.end());
      script += "set xtics (";
      for (std::size_t i = 0; i < xs.size(); ++i) script += (i ? ", " : "") + num(xs[i]);
      script += ")\n";
      if (logx) script += "set xrange [" + num(xs.front() / 1.2) + ":" + num(xs.back() * 1.2) + "]\n";
    }
    std::string plot_cmd = "plot ";
    bool any = false;
    for (std::size_t i = 0; i < series_.size(); ++i) {
      const auto& s = series_[i];
      std::string block = "$d" + std::to_string(i);
      script += block + " << EOD\n";
      std::size_t n = 0;
      for (const auto& p : s.points) {
        if (!std::isfinite(p.first) || !std::isfinite(p.second) || (logy && p.second <= 0)) continue;
        script += num(p.first) + " " + num(p.second) + "\n";
        ++n;
      }
      script += "EOD\n";
      if (n == 0) continue;
      plot_cmd += std::string(any ? ", " : "") + block + " using 1:2 with linespoints lw 2 pt 7 ps 0.6" +
                  (s.dashed ? " dt 2" : "") + " title " + quote(s.name);
      any = true;
    }
    if (!any) {
      if (err) *err = "nothing to plot for " + path;
      return false;
    }
    script += plot_cmd + "\n";
    std::FILE* g = ::popen("gnuplot 2>&1", "w");
    if (!g) {
      if (err) *err = std::string("cannot run gnuplot: ") + std::strerror(errno);
      return false;
    }
    const bool wrote = std::fwrite(script.data(), 1, script.size(), g) == script.size();
    const int rc = ::pclose(g);
    if (!wrote || rc != 0) {
      if (err)
        *err = rc == -1 || !WIFEXITED(rc) || WEXITSTATUS(rc) == 127
                   ? "gnuplot not found or failed (tools/bootstrap installs gnuplot-nox)"
                   : "gnuplot failed on " + path;
      return false;
    }
    return true;
  }

  // mkdir -p for one level (the plot directory); true if it exists afterwards.
  static bool ensure_dir(const std::string& dir) {
    if (::mkdir(dir.c_str(), 0777) == 0 || errno == EEXIST) {
      struct stat st;
      return ::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
    }
    return false;
  }

 private:
  struct Series {
    std::string name;
    std::vector<std::pair<double, double>> points;
    bool dashed;
  };
  // gnuplot's double-quoted strings: backslash escapes; a literal quote must be escaped.
  static std::string quote(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
      if (c == '"') out += "\\\"";
      else out += c;
    }
    return out + "\"";
  }
  static std::string num(double v) {
    char b[40];
    std::snprintf(b, sizeof b, "%.6g", v);
    return b;
  }

  std::string title_, xlabel_, ylabel_;
  std::vector<Series> series_;
};

}  // namespace jitpatch::bench
